//! The frames between a host and an isolated plugin's child process, over one Unix socket.
//!
//! A frame is `u32` length (little endian, of what follows), a tag byte, a `u64` request id, a
//! code byte, then text fields, each a `u32` length and UTF-8 bytes. Requests carry ids so that
//! calls from many threads share the socket: each answer names the request it answers.

use std::io::{self, Read, Write};

/// Largest frame accepted (256 MiB): a saved state or an answer beyond it is refused, not
/// read into memory.
pub(crate) const MAX_FRAME: usize = 256 << 20;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Tag {
    // Host to child.
    /// `[config]`: create the instance.
    Create = 1,
    /// `[method, params, chain]`: call a method.
    Call = 2,
    /// `[hook, payload, chain]`: deliver a hook.
    Hook = 3,
    /// `[]`: save the state.
    Save = 4,
    /// `[state]`: restore a state.
    Restore = 5,
    /// Answer to the child's [`Tag::HostCall`]: an [`Answer`].
    HostAnswer = 6,
    /// `[]`: destroy the instance and exit.
    Stop = 7,
    // Child to host.
    /// `[manifest json, shadow path]`: the plugin is loaded and checked.
    Loaded = 20,
    /// `[kind json]`: the plugin file was refused (a `LoadErrorKind` as JSON text).
    Refused = 21,
    /// Answer to a request: an [`Answer`].
    Answer = 22,
    /// `[plugin, method, params, chain]`: the plugin calls another plugin through the host.
    HostCall = 23,
    /// `[target, message]`, code = level: a log event of the child.
    Log = 24,
    /// `[operation, arguments]`: the plugin's operation on the host's shared store, answered
    /// with a [`Tag::HostAnswer`] as a [`Tag::HostCall`] is.
    HostStore = 25,
}

impl Tag {
    fn from_u8(byte: u8) -> Option<Tag> {
        Some(match byte {
            1 => Tag::Create,
            2 => Tag::Call,
            3 => Tag::Hook,
            4 => Tag::Save,
            5 => Tag::Restore,
            6 => Tag::HostAnswer,
            7 => Tag::Stop,
            20 => Tag::Loaded,
            21 => Tag::Refused,
            22 => Tag::Answer,
            23 => Tag::HostCall,
            25 => Tag::HostStore,
            24 => Tag::Log,
            _ => return None,
        })
    }
}

/// Codes of an answer frame: what its first field means.
pub(crate) mod code {
    /// The answer is `fields[0]`.
    pub(crate) const SOME: u8 = 0;
    /// No answer (`None`).
    pub(crate) const NONE: u8 = 1;
    /// Not supported by this plugin (an older table).
    pub(crate) const UNSUPPORTED: u8 = 2;
    /// The plugin's error: `fields[0]` is the message; the kind is `code - ERROR`.
    pub(crate) const ERROR: u8 = 10;
    /// The answer was not UTF-8 text: `fields[0]` is the decoder's message.
    pub(crate) const NOT_UTF8: u8 = 30;
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) tag: Tag,
    pub(crate) id: u64,
    pub(crate) code: u8,
    pub(crate) fields: Vec<String>,
}

impl Frame {
    /// Field `i`, empty when absent.
    pub(crate) fn field(&self, i: usize) -> &str {
        self.fields.get(i).map_or("", String::as_str)
    }

    /// Takes field `i`, empty when absent.
    pub(crate) fn take(&mut self, i: usize) -> String {
        self.fields
            .get_mut(i)
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

/// Writes one frame with one `write_all` of a buffer built first (frames from several threads
/// are written under a lock, never interleaved).
pub(crate) fn write_frame(
    out: &mut impl Write,
    tag: Tag,
    id: u64,
    code: u8,
    fields: &[&str],
) -> io::Result<()> {
    let body: usize = 1 + 8 + 1 + fields.iter().map(|f| 4 + f.len()).sum::<usize>();
    if body > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a frame of {body} bytes is over the limit of {MAX_FRAME}"),
        ));
    }
    let mut buffer = Vec::with_capacity(4 + body);
    buffer.extend_from_slice(&(body as u32).to_le_bytes());
    buffer.push(tag as u8);
    buffer.extend_from_slice(&id.to_le_bytes());
    buffer.push(code);
    for field in fields {
        buffer.extend_from_slice(&(field.len() as u32).to_le_bytes());
        buffer.extend_from_slice(field.as_bytes());
    }
    out.write_all(&buffer)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub(crate) fn read_frame(input: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut length = [0u8; 4];
    match input.read_exact(&mut length) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let length = u32::from_le_bytes(length) as usize;
    if !(10..=MAX_FRAME).contains(&length) {
        return Err(invalid(format!("a frame of {length} bytes")));
    }
    let mut body = vec![0u8; length];
    input.read_exact(&mut body)?;
    let tag = Tag::from_u8(body[0]).ok_or_else(|| invalid(format!("unknown tag {}", body[0])))?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&body[1..9]);
    let code = body[9];
    let mut fields = Vec::new();
    let mut rest = &body[10..];
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(invalid("a truncated field length".to_owned()));
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(&rest[..4]);
        let len = u32::from_le_bytes(len) as usize;
        rest = &rest[4..];
        if rest.len() < len {
            return Err(invalid("a truncated field".to_owned()));
        }
        let text = std::str::from_utf8(&rest[..len])
            .map_err(|e| invalid(format!("a field that is not UTF-8 ({e})")))?;
        fields.push(text.to_owned());
        rest = &rest[len..];
    }
    Ok(Some(Frame {
        tag,
        id: u64::from_le_bytes(id),
        code,
        fields,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        let mut buffer = Vec::new();
        write_frame(&mut buffer, Tag::Call, 7, 0, &["echo", "{\"a\":1}", ""]).unwrap();
        write_frame(&mut buffer, Tag::Stop, 8, 3, &[]).unwrap();
        let mut input = buffer.as_slice();
        let frame = read_frame(&mut input).unwrap().unwrap();
        assert_eq!(frame.tag, Tag::Call);
        assert_eq!(frame.id, 7);
        assert_eq!(frame.fields, ["echo", "{\"a\":1}", ""]);
        let frame = read_frame(&mut input).unwrap().unwrap();
        assert_eq!((frame.tag, frame.id, frame.code), (Tag::Stop, 8, 3));
        assert!(read_frame(&mut input).unwrap().is_none());
        let mut garbage: &[u8] = &[255, 255, 255, 255, 1];
        assert!(read_frame(&mut garbage).is_err());
        let mut unknown: &[u8] = &[10, 0, 0, 0, 99, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(read_frame(&mut unknown).is_err());
    }
}
