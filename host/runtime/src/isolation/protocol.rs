//! The frames between a host and an isolated plugin's child process: over its control socket
//! and answer pipe, and in its call region (`super::shm`), the same bytes.
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
    pub(crate) fn from_u8(byte: u8) -> Option<Tag> {
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

/// The bytes of a frame with these fields, its length prefix included.
pub(crate) fn frame_len<S: AsRef<str>>(fields: &[S]) -> usize {
    4 + 1 + 8 + 1 + fields.iter().map(|f| 4 + f.as_ref().len()).sum::<usize>()
}

/// Appends one frame to `buffer` (cleared first).
pub(crate) fn encode(
    buffer: &mut Vec<u8>,
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
    buffer.clear();
    buffer.reserve(4 + body);
    buffer.extend_from_slice(&(body as u32).to_le_bytes());
    buffer.push(tag as u8);
    buffer.extend_from_slice(&id.to_le_bytes());
    buffer.push(code);
    for field in fields {
        buffer.extend_from_slice(&(field.len() as u32).to_le_bytes());
        buffer.extend_from_slice(field.as_bytes());
    }
    Ok(())
}

/// Writes one frame with one `write_all` of a buffer built first (frames from several threads
/// are written under a lock, never interleaved).
#[cfg(test)]
pub(crate) fn write_frame(
    out: &mut impl Write,
    tag: Tag,
    id: u64,
    code: u8,
    fields: &[&str],
) -> io::Result<()> {
    let mut buffer = Vec::new();
    encode(&mut buffer, tag, id, code, fields)?;
    out.write_all(&buffer)
}

/// A socket's writing side with a buffer kept between frames: one `write` a frame, no
/// allocation once the buffer has grown to the usual frame. Shared under a lock, so frames are
/// never interleaved.
#[derive(Debug)]
pub(crate) struct FrameWriter<W> {
    out: W,
    buffer: Vec<u8>,
}

/// A buffer grown beyond this by a large frame is given back after it.
const KEPT_BUFFER: usize = 64 << 10;

impl<W: Write> FrameWriter<W> {
    pub(crate) fn new(out: W) -> Self {
        Self {
            out,
            buffer: Vec::with_capacity(512),
        }
    }

    /// The stream written to.
    pub(crate) fn get_ref(&self) -> &W {
        &self.out
    }

    pub(crate) fn send(&mut self, tag: Tag, id: u64, code: u8, fields: &[&str]) -> io::Result<()> {
        encode(&mut self.buffer, tag, id, code, fields)?;
        let written = self.out.write_all(&self.buffer);
        if self.buffer.capacity() > KEPT_BUFFER {
            self.buffer = Vec::with_capacity(512);
        }
        written
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// The body of a frame (after its length): the frame.
fn parse(body: &[u8]) -> io::Result<Frame> {
    let mut frame = Frame {
        tag: Tag::Answer,
        id: 0,
        code: 0,
        fields: Vec::new(),
    };
    parse_into(body, &mut frame)?;
    Ok(frame)
}

/// [`parse`] into `frame`, using its fields' buffers again. `body` has at least 10 bytes.
fn parse_into(body: &[u8], frame: &mut Frame) -> io::Result<()> {
    let tag = Tag::from_u8(body[0]).ok_or_else(|| invalid(format!("unknown tag {}", body[0])))?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&body[1..9]);
    let code = body[9];
    let mut count = 0;
    let fields = &mut frame.fields;
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
        match fields.get_mut(count) {
            Some(field) => text.clone_into(field),
            None => fields.push(text.to_owned()),
        }
        count += 1;
        rest = &rest[len..];
    }
    fields.truncate(count);
    frame.tag = tag;
    frame.id = u64::from_le_bytes(id);
    frame.code = code;
    Ok(())
}

/// A socket's reading side, buffered: one `read` brings a whole small frame (or several), where
/// reading the length and then the body took two. A read that times out midway keeps what it
/// got, so a reader with a deadline can wait again without losing its place in the stream.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    buffer: Vec<u8>,
    /// The unread bytes are `buffer[start..end]`.
    start: usize,
    end: usize,
}

impl FrameReader {
    /// The next whole frame in the buffer, if there is one; an error if the bytes are not a
    /// frame (the stream is then useless).
    pub(crate) fn next(&mut self) -> io::Result<Option<Frame>> {
        let unread = &self.buffer[self.start..self.end];
        if unread.len() < 4 {
            return Ok(None);
        }
        let length = u32::from_le_bytes([unread[0], unread[1], unread[2], unread[3]]) as usize;
        if !(10..=MAX_FRAME).contains(&length) {
            return Err(invalid(format!("a frame of {length} bytes")));
        }
        if unread.len() < 4 + length {
            return Ok(None);
        }
        let frame = parse(&unread[4..4 + length]);
        self.start += 4 + length;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
            if self.buffer.len() > KEPT_BUFFER {
                self.buffer = Vec::new();
            }
        }
        frame.map(Some)
    }

    /// Reads what `input` has (one `read`): the number of bytes, 0 at the end of the stream.
    pub(crate) fn fill(&mut self, input: &mut impl Read) -> io::Result<usize> {
        // Room for the frame under way (its length is known once 4 bytes are in), at least
        // 4 KiB; what is unread moves to the front first.
        let unread = self.end - self.start;
        let wanted = if unread >= 4 {
            let b = &self.buffer[self.start..self.start + 4];
            4 + u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
        } else {
            0
        };
        // A large frame's room grows with what arrives (a length alone reserves no more than
        // a MiB beyond it), so that a peer cannot make the reader allocate by announcing.
        let wanted = wanted.min(unread + (1 << 20)).clamp(4 << 10, 4 + MAX_FRAME);
        if self.start > 0 && self.start + wanted > self.buffer.len() {
            self.buffer.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, unread);
        }
        if self.buffer.len() < self.start + wanted {
            self.buffer.resize(self.start + wanted, 0);
        }
        let n = input.read(&mut self.buffer[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Reads until a whole frame is in; `Ok(None)` at the end of the stream between frames.
    pub(crate) fn read(&mut self, input: &mut impl Read) -> io::Result<Option<Frame>> {
        self.read_with(input, |_| Ok(()))
    }

    /// As [`FrameReader::read`], given up at `deadline` however the peer spaces its bytes or
    /// frames: each `read` waits at most what is left. The error is then
    /// [`io::ErrorKind::TimedOut`], or [`io::ErrorKind::WouldBlock`] from a read that timed out.
    pub(crate) fn read_by(
        &mut self,
        input: &mut std::os::unix::net::UnixStream,
        deadline: std::time::Instant,
    ) -> io::Result<Option<Frame>> {
        self.read_with(input, |input| {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            input.set_read_timeout(Some(left))
        })
    }

    /// Reads until a whole frame is in, calling `before_read` before each `read`.
    fn read_with<R: Read>(
        &mut self,
        input: &mut R,
        mut before_read: impl FnMut(&mut R) -> io::Result<()>,
    ) -> io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.next()? {
                return Ok(Some(frame));
            }
            before_read(input)?;
            match self.fill(input) {
                Ok(0) if self.start == self.end => return Ok(None),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the stream ended inside a frame",
                    ));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
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
        let mut reader = FrameReader::default();
        let frame = reader.read(&mut input).unwrap().unwrap();
        assert_eq!(frame.tag, Tag::Call);
        assert_eq!(frame.id, 7);
        assert_eq!(frame.fields, ["echo", "{\"a\":1}", ""]);
        let frame = reader.read(&mut input).unwrap().unwrap();
        assert_eq!((frame.tag, frame.id, frame.code), (Tag::Stop, 8, 3));
        assert!(reader.read(&mut input).unwrap().is_none());
        let mut garbage: &[u8] = &[255, 255, 255, 255, 1];
        assert!(FrameReader::default().read(&mut garbage).is_err());
        let mut unknown: &[u8] = &[10, 0, 0, 0, 99, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(FrameReader::default().read(&mut unknown).is_err());
    }

    /// Frames that arrive a byte at a time, several in one read, or larger than the buffer are
    /// read whole and in order; a stream cut inside a frame is an error, not a frame.
    #[test]
    fn the_buffered_reader_reassembles_frames_however_they_arrive() {
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                let n = self.1.min(self.0.len()).min(out.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let big = "x".repeat(100_000);
        let mut bytes = Vec::new();
        let mut writer = FrameWriter::new(&mut bytes);
        writer.send(Tag::Answer, 1, 0, &["one"]).unwrap();
        writer.send(Tag::Answer, 2, 1, &[&big, ""]).unwrap();
        writer.send(Tag::Log, 3, 2, &[]).unwrap();
        for step in [1, 7, 4096, usize::MAX] {
            let mut input = Trickle(&bytes, step);
            let mut reader = FrameReader::default();
            let ids: Vec<(u64, Vec<String>)> =
                std::iter::from_fn(|| reader.read(&mut input).unwrap())
                    .map(|f| (f.id, f.fields))
                    .collect();
            assert_eq!(
                ids,
                [
                    (1, vec!["one".to_owned()]),
                    (2, vec![big.clone(), String::new()]),
                    (3, vec![])
                ],
                "step {step}"
            );
        }
        let mut cut = Trickle(&bytes[..30], 5);
        let mut reader = FrameReader::default();
        assert!(reader.read(&mut cut).unwrap().is_some());
        assert!(reader.read(&mut cut).is_err());
    }
}
