//! The shared memory between the host and an isolated plugin's child that carries one call at
//! a time: a sealed `memfd` of [`SIZE`] bytes, mapped by both sides, holding a request slot and
//! an answer slot, each with a sequence number and a length, and a futex word on each side to
//! wake the other. The child is hostile: everything in the region may change under the host at
//! any moment, so the host reads each byte there once, into its own memory, and checks it
//! there (see [`Region::answer`]), and nothing it reads there is an index into its own memory.
//! Frames are written into a slot and read out of it directly (no buffer of the whole frame in
//! between); a slot's words alternate with the other slot's, so that a small call touches
//! only the region's first page.
//!
//! The mapping is the only unsafe code here; the protocol is safe code on atomics: the region
//! is seen as `u32` header words and `u64` slot words, never as bytes.

use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::protocol::{self, Frame, Tag};

/// Bytes of the region: a page of header (the first 256 bytes used) would waste little, but
/// the slots are what matter: a frame up to [`SLOT`] bytes goes through here, a larger one over
/// the pipes.
pub(crate) const SIZE: usize = 64 << 10;
/// Bytes of the header: `u32` words, the request's on the first cache line, the answer's on
/// the second.
const HEADER: usize = 256;
const HEADER_WORDS: usize = HEADER / 4;
/// Words of each slot.
const SLOT_WORDS: usize = (SIZE - HEADER) / 8 / 2;
/// The largest frame a slot holds, in bytes.
pub(crate) const SLOT: usize = SLOT_WORDS * 8;

// Header words.
/// The request's sequence number: the host bumps it when a request is in.
const REQ_SEQ: usize = 0;
/// The child sleeps (or is about to) on [`REQ_SEQ`]: the host wakes it.
const CHILD_SLEEPING: usize = 1;
/// The request frame's length in bytes.
const REQ_LEN: usize = 2;
/// The sequence number of the request answered last.
const ANS_SEQ: usize = 16;
/// The host sleeps (or is about to) on [`ANS_SEQ`]: the child wakes it.
const HOST_SLEEPING: usize = 17;
/// The answer frame's length in bytes, or [`ON_THE_PIPE`].
const ANS_LEN: usize = 18;

/// The answer length that says the answer went over the answer pipe (it did not fit, or log
/// events of the call went there first and the answer must come after them).
const ON_THE_PIPE: u32 = u32::MAX;

/// The longest one futex wait lasts before its caller looks around again (a deadline, a child
/// seen to end).
pub(crate) const TICK: Duration = Duration::from_secs(1);

/// The mapping of the region.
pub(crate) struct Region {
    base: NonNull<u8>,
}

// SAFETY: the region is only reached through atomics (`header` and `slots`), which any thread
// may use at once; the mapping itself is owned by the value and unmapped once, on drop.
unsafe impl Send for Region {}
// SAFETY: as for `Send`: shared references only hand out atomics.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").finish_non_exhaustive()
    }
}

impl Region {
    /// A new region (for the host): a `memfd` of [`SIZE`] zero bytes, sealed against shrinking
    /// and growing (a child that could shrink it would make the host's reads fault), mapped;
    /// and the descriptor to pass to the child.
    pub(crate) fn create() -> std::io::Result<(Region, OwnedFd)> {
        use rustix::fs::{MemfdFlags, SealFlags};
        let fd = rustix::fs::memfd_create(
            "plugin-calls",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        rustix::fs::ftruncate(&fd, SIZE as u64)?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        let region = Region::map(&fd)?;
        Ok((region, fd))
    }

    /// Maps the region the host passed (for the child), after checking its size.
    pub(crate) fn open(fd: &OwnedFd) -> std::io::Result<Region> {
        let size = rustix::fs::fstat(fd)?.st_size;
        if usize::try_from(size).ok() != Some(SIZE) {
            return Err(std::io::Error::other(format!(
                "the call region has {size} bytes, not {SIZE}"
            )));
        }
        Region::map(fd)
    }

    fn map(fd: &OwnedFd) -> std::io::Result<Region> {
        use rustix::mm::{MapFlags, ProtFlags};
        // SAFETY: a new shared mapping at an address the kernel picks, of a memfd at least
        // `SIZE` bytes long that cannot shrink (the host sealed it before anyone else had it):
        // it overlaps nothing of ours, and every byte of it stays backed.
        let base = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                SIZE,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )?
        };
        let base = NonNull::new(base.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("the call region was mapped at address 0"))?;
        Ok(Region { base })
    }

    fn header(&self) -> &[AtomicU32] {
        // SAFETY: the mapping is page-aligned, `SIZE` bytes long and lives as long as `self`;
        // in this process its first `HEADER` bytes are only ever reached through these
        // atomics, so no Rust reference aliases them. The other process is outside this
        // program's memory model and may write anything at any time: an aligned word's atomic
        // load still yields one whole `u32` (the hardware does not tear it), and every value
        // read is checked before it is used.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().cast::<AtomicU32>(), HEADER_WORDS) }
    }

    fn slots(&self) -> &[AtomicU64] {
        // SAFETY: the rest of the mapping after the header, 8-aligned (`HEADER` is a multiple
        // of 8), `2 * SLOT_WORDS` words within `SIZE`; in this process only ever reached
        // through these atomics (see `header` for the other process's writes).
        unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().add(HEADER).cast::<AtomicU64>(),
                2 * SLOT_WORDS,
            )
        }
    }

    fn word(&self, index: usize) -> &AtomicU32 {
        &self.header()[index]
    }

    /// Slot `slot` (0: request, 1: answer). The two slots' words alternate, so that a small
    /// request and its answer lie on the region's first page, with its header: a call
    /// touches one page of it, not three.
    fn slot(&self, slot: usize) -> Slot<'_> {
        Slot {
            words: self.slots().get(slot..).unwrap_or(&[]),
        }
    }

    /// Writes one frame (see [`protocol`]) straight into slot `slot`, with no buffer in
    /// between: its length in bytes, or `None` (nothing written) when it is larger than
    /// [`SLOT`].
    fn put_frame<S: AsRef<str>>(
        &self,
        slot: usize,
        tag: Tag,
        id: u64,
        code: u8,
        fields: &[S],
    ) -> Option<usize> {
        let len = protocol::frame_len(fields);
        if len > SLOT {
            return None;
        }
        let mut out = SlotWriter::new(self.slot(slot));
        let mut head = [0u8; 14];
        head[..4].copy_from_slice(&((len - 4) as u32).to_le_bytes());
        head[4] = tag as u8;
        head[5..13].copy_from_slice(&id.to_le_bytes());
        head[13] = code;
        out.write(&head);
        for field in fields {
            let field = field.as_ref().as_bytes();
            out.write(&(field.len() as u32).to_le_bytes());
            out.write(field);
        }
        out.flush();
        Some(len)
    }

    /// Reads the frame of `len` bytes (checked: at most [`SLOT`]) in slot `slot` into `frame`
    /// (its fields' buffers used again), with no buffer in between: each byte is read from
    /// the region once, into the host's own memory, and checked there (lengths against `len`,
    /// which is the caller's copy, and text as UTF-8): what the other side changes meanwhile
    /// makes at worst a wrong frame, never a read out of bounds.
    fn take_frame(&self, slot: usize, len: usize, frame: &mut Frame) -> Result<(), ()> {
        if !(14..=SLOT).contains(&len) {
            return Err(());
        }
        let words = self.slot(slot);
        let mut small = [0u8; 14];
        copy_into(words, 0, &mut small);
        let announced = u32::from_le_bytes([small[0], small[1], small[2], small[3]]) as usize;
        if announced != len - 4 {
            return Err(());
        }
        let tag = Tag::from_u8(small[4]).ok_or(())?;
        let mut id = [0u8; 8];
        id.copy_from_slice(&small[5..13]);
        let mut count = 0;
        let mut at = 14;
        while at < len {
            if len - at < 4 {
                return Err(());
            }
            let mut field_len = [0u8; 4];
            copy_into(words, at, &mut field_len);
            let field_len = u32::from_le_bytes(field_len) as usize;
            at += 4;
            if len - at < field_len {
                return Err(());
            }
            if frame.fields.len() <= count {
                frame.fields.push(String::new());
            }
            let field = frame.fields.get_mut(count).ok_or(())?;
            let mut bytes = std::mem::take(field).into_bytes();
            bytes.clear();
            copy_pieces(words, at, field_len, |piece| bytes.extend_from_slice(piece));
            *field = String::from_utf8(bytes).map_err(|_| ())?;
            count += 1;
            at += field_len;
        }
        frame.fields.truncate(count);
        frame.tag = tag;
        frame.id = u64::from_le_bytes(id);
        frame.code = small[13];
        Ok(())
    }

    /// Sleeps on header word `index` while it holds `seen`, at most `timeout` (`None`: until
    /// woken), telling the other side through `sleeping`. Returns at once if the word changed;
    /// may return early.
    fn sleep(&self, index: usize, sleeping: usize, seen: u32, timeout: Option<Duration>) {
        let word = self.word(index);
        self.word(sleeping).store(1, Ordering::SeqCst);
        if word.load(Ordering::SeqCst) != seen {
            return;
        }
        let timeout = timeout.map(|timeout| {
            rustix::thread::futex::Timespec::try_from(timeout).unwrap_or(
                rustix::thread::futex::Timespec {
                    tv_sec: 1,
                    tv_nsec: 0,
                },
            )
        });
        // Shared, not private: the other process wakes this word through its own mapping.
        // EAGAIN (changed), ETIMEDOUT, EINTR: the caller looks again either way.
        let _ = rustix::thread::futex::wait(
            word,
            rustix::thread::futex::Flags::empty(),
            seen,
            timeout.as_ref(),
        );
    }

    /// Stores `value` in header word `index` and wakes the other side if it sleeps there: the
    /// wake costs a system call only then.
    fn publish(&self, index: usize, sleeping: usize, value: u32) {
        let word = self.word(index);
        word.store(value, Ordering::SeqCst);
        if self.word(sleeping).swap(0, Ordering::SeqCst) != 0 {
            let _ = rustix::thread::futex::wake(word, rustix::thread::futex::Flags::empty(), 1);
        }
    }

    // The host's side.

    /// Puts request `seq`, a frame of these parts, straight into the region and wakes the
    /// child; `false` (nothing sent) when the frame is larger than [`SLOT`].
    pub(crate) fn request(&self, seq: u32, tag: Tag, id: u64, fields: &[&str]) -> bool {
        let Some(len) = self.put_frame(0, tag, id, 0, fields) else {
            return false;
        };
        self.word(REQ_LEN).store(len as u32, Ordering::Relaxed);
        self.publish(REQ_SEQ, CHILD_SLEEPING, seq);
        true
    }

    /// The answer to request `seq`, when the child says it is in: `Answer::Here` with its
    /// frame read into `frame` (to be checked still: it is the child's), `Answer::OnThePipe`,
    /// or `Answer::Invalid` for a length no slot holds or bytes that are not one frame.
    pub(crate) fn answer(&self, seq: u32, frame: &mut Frame) -> Answer {
        if self.word(ANS_SEQ).load(Ordering::Acquire) != seq {
            return Answer::NotYet;
        }
        match self.word(ANS_LEN).load(Ordering::Acquire) {
            ON_THE_PIPE => Answer::OnThePipe,
            len if self.take_frame(1, len as usize, frame).is_ok() => Answer::Here,
            _ => Answer::Invalid,
        }
    }

    /// The answer's sequence number as it is now: what [`wait_answer`](Self::wait_answer)
    /// sleeps on, read before looking at anything that could change it (the answer, the
    /// child's end), so that no change in between is slept through.
    pub(crate) fn answered(&self) -> u32 {
        self.word(ANS_SEQ).load(Ordering::SeqCst)
    }

    /// Sleeps while the answer's sequence number is still `seen`, at most `timeout`.
    pub(crate) fn wait_answer(&self, seen: u32, timeout: Duration) {
        self.sleep(ANS_SEQ, HOST_SLEEPING, seen, Some(timeout));
    }

    /// Wakes every caller sleeping on the answer (the child ended): the number changes, so a
    /// caller about to sleep does not.
    pub(crate) fn wake_host(&self) {
        let word = self.word(ANS_SEQ);
        word.fetch_add(1 << 31, Ordering::SeqCst);
        let _ = rustix::thread::futex::wake(word, rustix::thread::futex::Flags::empty(), u32::MAX);
    }

    // The child's side.

    /// Waits for a request after `last` (at most `timeout`; `None`: until the host wakes it):
    /// its sequence number, and whether its frame was whole (then read into `frame`, its
    /// fields' buffers used again); or `None`.
    ///
    /// The child's own loop waits without a timeout: a timed futex wait arms a kernel timer
    /// and cancels it on every call, which cost 0.06 to 0.11 of a pipe round trip per call on
    /// this project's VM (both sides' timers; the host's stay, bounding its calls), and the
    /// child has nothing to look at between requests: it ends with the host (the death
    /// signal), on a `Stop` (its control socket's reader exits the process), or killed.
    pub(crate) fn next_request(
        &self,
        last: u32,
        frame: &mut Frame,
        timeout: Option<Duration>,
    ) -> Option<(u32, bool)> {
        let mut seq = self.word(REQ_SEQ).load(Ordering::SeqCst);
        if seq == last {
            self.sleep(REQ_SEQ, CHILD_SLEEPING, last, timeout);
            seq = self.word(REQ_SEQ).load(Ordering::SeqCst);
            if seq == last {
                return None;
            }
        }
        let len = self.word(REQ_LEN).load(Ordering::Relaxed) as usize;
        // A request that is not one frame is answered by nothing: the host's deadline ends it.
        Some((seq, self.take_frame(0, len, frame).is_ok()))
    }

    /// Answers request `seq` with a frame of these parts, written straight into the region,
    /// and wakes the host; `false` (nothing sent) when the frame is larger than [`SLOT`].
    pub(crate) fn answer_here<S: AsRef<str>>(
        &self,
        seq: u32,
        id: u64,
        code: u8,
        fields: &[S],
    ) -> bool {
        let Some(len) = self.put_frame(1, Tag::Answer, id, code, fields) else {
            return false;
        };
        self.word(ANS_LEN).store(len as u32, Ordering::Relaxed);
        self.publish(ANS_SEQ, HOST_SLEEPING, seq);
        true
    }

    /// Says that request `seq`'s answer is (or will be) on the answer pipe, and wakes the host.
    pub(crate) fn answer_on_the_pipe(&self, seq: u32) {
        self.word(ANS_LEN).store(ON_THE_PIPE, Ordering::Relaxed);
        self.publish(ANS_SEQ, HOST_SLEEPING, seq);
    }
}

/// The words of one slot: word `i` is `words[2 * i]` (the other slot's are in between).
#[derive(Clone, Copy)]
struct Slot<'a> {
    words: &'a [AtomicU64],
}

impl<'a> Slot<'a> {
    fn get(self, i: usize) -> Option<&'a AtomicU64> {
        self.words.get(2 * i)
    }

    fn iter(self) -> std::iter::StepBy<std::slice::Iter<'a, AtomicU64>> {
        self.words.iter().step_by(2)
    }
}

/// Bytes a [`SlotWriter`] gathers before it stores them as words.
const BLOCK: usize = 128;

/// Writes a byte stream into a slot's words: the bytes are gathered in a block of the
/// writer's own (small pieces cost a copy each, not a word store each), stored a word at a
/// time when it is full and at the end.
struct SlotWriter<'a> {
    words: std::iter::StepBy<std::slice::Iter<'a, AtomicU64>>,
    block: [u8; BLOCK],
    filled: usize,
}

impl<'a> SlotWriter<'a> {
    fn new(slot: Slot<'a>) -> Self {
        SlotWriter {
            words: slot.iter(),
            block: [0; BLOCK],
            filled: 0,
        }
    }

    /// Appends `bytes`: a copy into the block when they fit (the common case, inlined: a
    /// length or a header is a move or two), else [`write_long`](Self::write_long).
    #[inline(always)]
    fn write(&mut self, bytes: &[u8]) {
        let end = self.filled + bytes.len();
        match self.block.get_mut(self.filled..end) {
            Some(room) if end < BLOCK => {
                room.copy_from_slice(bytes);
                self.filled = end;
            }
            _ => self.write_long(bytes),
        }
    }

    #[inline(never)]
    fn write_long(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = (BLOCK - self.filled).min(bytes.len());
            let (now, later) = bytes.split_at(n);
            if let Some(room) = self.block.get_mut(self.filled..self.filled + n) {
                room.copy_from_slice(now);
            }
            self.filled += n;
            bytes = later;
            if self.filled == BLOCK {
                self.flush();
            }
        }
    }

    /// Stores the block's bytes as whole words (the last one's bytes after the stream are
    /// whatever the block held: beyond the frame).
    fn flush(&mut self) {
        let whole = self.filled.div_ceil(8) * 8;
        let block = self.block.get(..whole).unwrap_or(&[]);
        // `chunks` first: `zip` takes no word once the chunks are done.
        for (chunk, word) in block.chunks_exact(8).zip(self.words.by_ref()) {
            let eight: [u8; 8] = chunk.try_into().unwrap_or_default();
            word.store(u64::from_ne_bytes(eight), Ordering::Relaxed);
        }
        self.filled = 0;
    }
}

/// Calls `f` with the bytes `at..at + len` of `words`, a word's worth at most at a time, each
/// word read once. Bytes beyond `words` are not there (the caller checked the bounds).
fn copy_pieces(words: Slot<'_>, at: usize, len: usize, mut f: impl FnMut(&[u8])) {
    let (mut at, end) = (at, at + len);
    while at < end {
        let Some(word) = words.get(at / 8) else {
            return;
        };
        let bytes = word.load(Ordering::Relaxed).to_ne_bytes();
        let from = at % 8;
        let to = (from + (end - at)).min(8);
        f(&bytes[from..to]);
        at += to - from;
    }
}

/// Fills `out` with the bytes from `at` of `words`.
fn copy_into(words: Slot<'_>, at: usize, out: &mut [u8]) {
    let mut filled = 0;
    copy_pieces(words, at, out.len(), |piece| {
        out[filled..filled + piece.len()].copy_from_slice(piece);
        filled += piece.len();
    });
}

/// What [`Region::answer`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    NotYet,
    Here,
    OnThePipe,
    Invalid,
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; nothing borrows from it any more
        // (every borrow is tied to `&self`).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isolation::protocol::code;

    fn pair() -> (Region, Region) {
        let (host, fd) = Region::create().unwrap();
        let child = Region::open(&fd).unwrap();
        (host, child)
    }

    fn frame() -> Frame {
        Frame {
            tag: Tag::Answer,
            id: 0,
            code: 0,
            fields: Vec::new(),
        }
    }

    #[test]
    fn a_request_and_its_answer_go_through_both_mappings() {
        let (host, child) = pair();
        let mut got = frame();
        assert_eq!(
            child.next_request(0, &mut got, Some(TICK)),
            None,
            "nothing yet, after a tick"
        );
        assert!(host.request(1, Tag::Call, 7, &["echo", "{\"a\":1}", ""]));
        assert_eq!(child.next_request(0, &mut got, Some(TICK)), Some((1, true)));
        assert_eq!((got.tag, got.id, got.code), (Tag::Call, 7, 0));
        assert_eq!(got.fields, ["echo", "{\"a\":1}", ""]);
        assert_eq!(host.answer(1, &mut got), Answer::NotYet);
        // The largest answer a slot holds, and one byte more.
        let big = "x".repeat(SLOT - protocol::frame_len(&[""]));
        assert!(!child.answer_here(1, 9, 0, &[format!("{big}y")]));
        assert!(child.answer_here(1, 9, 0, &[big.as_str()]));
        assert_eq!(host.answer(1, &mut got), Answer::Here);
        assert_eq!((got.tag, got.id, got.code), (Tag::Answer, 9, 0));
        assert_eq!(got.fields, [big]);
        // Fields of every length, at every offset within a word, read back whole; a frame
        // with fewer fields than the one before leaves none behind.
        for n in 0..20 {
            let fields: Vec<String> = (0..n).map(|i| "abcdefghijk"[..i % 11].to_owned()).collect();
            host.request(
                2 + n as u32,
                Tag::Hook,
                n as u64,
                &fields.iter().map(String::as_str).collect::<Vec<_>>(),
            );
            assert_eq!(
                child.next_request(1 + n as u32, &mut got, Some(TICK)),
                Some((2 + n as u32, true))
            );
            assert_eq!((got.tag, got.id), (Tag::Hook, n as u64));
            assert_eq!(got.fields, fields, "{n} fields");
        }
        assert!(child.answer_here(21, 3, code::NONE, &[] as &[&str]));
        assert_eq!(host.answer(21, &mut got), Answer::Here);
        assert_eq!((got.id, got.code, got.fields.len()), (3, code::NONE, 0));
        host.request(22, Tag::Save, 4, &[]);
        assert_eq!(
            child.next_request(21, &mut got, Some(TICK)),
            Some((22, true))
        );
        child.answer_on_the_pipe(22);
        assert_eq!(host.answer(22, &mut got), Answer::OnThePipe);
        assert_eq!(host.answer(23, &mut got), Answer::NotYet);
    }

    /// Bytes in the answer slot that are not exactly one frame of the length the header says
    /// are refused: cut anywhere, a byte too many, a lying length prefix, a field length
    /// beyond the frame, text that is not UTF-8, an unknown tag.
    #[test]
    fn an_answer_that_is_not_one_frame_is_refused() {
        let (host, child) = pair();
        let mut got = frame();
        let mut bytes = Vec::new();
        protocol::encode(&mut bytes, Tag::Answer, 9, 1, &["a", "bc"]).unwrap();
        let put = |bytes: &[u8], len: usize, seq: u32| {
            let mut writer = SlotWriter::new(child.slot(1));
            writer.write(bytes);
            writer.flush();
            child.word(ANS_LEN).store(len as u32, Ordering::Relaxed);
            child.word(ANS_SEQ).store(seq, Ordering::SeqCst);
        };
        put(&bytes, bytes.len(), 1);
        assert_eq!(host.answer(1, &mut got), Answer::Here);
        assert_eq!((got.tag, got.id, got.code), (Tag::Answer, 9, 1));
        assert_eq!(got.fields, ["a", "bc"]);
        for cut in 0..bytes.len() {
            put(&bytes, cut, 2 + cut as u32);
            assert_eq!(
                host.answer(2 + cut as u32, &mut got),
                Answer::Invalid,
                "cut at {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        put(&longer, longer.len(), 100);
        assert_eq!(
            host.answer(100, &mut got),
            Answer::Invalid,
            "a byte too many"
        );
        for (at, value, what) in [
            (0, 200, "a lying length"),
            (14, 255, "a field length beyond the frame"),
            (18, 0xff, "not UTF-8"),
            (4, 99, "an unknown tag"),
        ] {
            let mut wrong = bytes.clone();
            wrong[at] = value;
            put(&wrong, wrong.len(), 101 + at as u32);
            assert_eq!(
                host.answer(101 + at as u32, &mut got),
                Answer::Invalid,
                "{what}"
            );
        }
    }

    /// The child cannot shrink the region under the host (its reads would fault) nor grow it.
    #[test]
    fn the_region_is_sealed_against_resizing() {
        let (_host, fd) = Region::create().unwrap();
        assert!(rustix::fs::ftruncate(&fd, 0).is_err());
        assert!(rustix::fs::ftruncate(&fd, 2 * SIZE as u64).is_err());
        assert!(rustix::fs::fcntl_add_seals(&fd, rustix::fs::SealFlags::WRITE).is_err());
    }

    /// A child that writes what it likes into the header gets at most "invalid" or "not yet"
    /// for its own answer: a length beyond the slot is never read.
    #[test]
    fn a_scribbled_header_is_refused_not_followed() {
        let (host, child) = pair();
        let mut got = frame();
        for len in [SLOT as u32 + 1, u32::MAX - 1, 1 << 31] {
            child.word(ANS_LEN).store(len, Ordering::Relaxed);
            child.word(ANS_SEQ).store(5, Ordering::SeqCst);
            assert_eq!(host.answer(5, &mut got), Answer::Invalid, "length {len}");
            assert!(got.fields.is_empty());
        }
        child.word(ANS_LEN).store(3, Ordering::Relaxed);
        assert_eq!(
            host.answer(4, &mut got),
            Answer::NotYet,
            "another request's number"
        );
        // A scribbled request length on the child's side: no request, nothing read.
        host.word(REQ_LEN).store(u32::MAX, Ordering::Relaxed);
        host.word(REQ_SEQ).store(9, Ordering::SeqCst);
        assert_eq!(
            child.next_request(0, &mut got, Some(TICK)),
            Some((9, false))
        );
    }

    /// Every wait is bounded: with no answer, the host's wait ends at its timeout; a child
    /// that ended wakes it at once, and a waiter about to sleep does not sleep.
    #[test]
    fn waits_end_at_their_timeout_or_when_woken() {
        let (host, _child) = pair();
        let started = std::time::Instant::now();
        host.wait_answer(host.answered(), Duration::from_millis(50));
        assert!(started.elapsed() >= Duration::from_millis(40));
        let host = std::sync::Arc::new(host);
        let waiter = {
            let host = std::sync::Arc::clone(&host);
            let seen = host.answered();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                host.wait_answer(seen, Duration::from_secs(30));
                started.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let seen = host.answered();
        host.wake_host();
        assert!(waiter.join().unwrap() < Duration::from_secs(20));
        assert_eq!(host.answer(1, &mut frame()), Answer::NotYet);
        let started = std::time::Instant::now();
        host.wait_answer(seen, Duration::from_secs(30));
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no sleep once woken"
        );
    }
}
