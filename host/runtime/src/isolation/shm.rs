//! The shared memory between the host and an isolated plugin's child that carries one call at
//! a time: a sealed `memfd` of [`SIZE`] bytes, mapped by both sides, holding a request slot and
//! an answer slot, each with a sequence number and a length, and a futex word on each side to
//! wake the other. The child is hostile: everything in the region may change under the host at
//! any moment, so the host copies what it reads out before looking at it (see
//! [`Region::answer`]), and nothing it reads there is an index into its own memory.
//!
//! This module holds the mapping only; the unsafe code is here, the protocol is safe code on
//! atomics: the region is seen as `u32` header words and `u64` slot words, never as bytes.

use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

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
        // its first `HEADER` bytes are only ever seen as these atomics, by both processes
        // (the other process's plain writes are as good as atomic ones for aligned words).
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().cast::<AtomicU32>(), HEADER_WORDS) }
    }

    fn slots(&self) -> &[AtomicU64] {
        // SAFETY: the rest of the mapping after the header, 8-aligned (`HEADER` is a multiple
        // of 8), `2 * SLOT_WORDS` words within `SIZE`; only ever seen as these atomics.
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

    /// Copies `bytes` (at most [`SLOT`]) into slot `slot` (0: request, 1: answer).
    fn put(&self, slot: usize, bytes: &[u8]) {
        let words = &self.slots()[slot * SLOT_WORDS..(slot + 1) * SLOT_WORDS];
        let chunks = bytes.chunks_exact(8);
        let rest = chunks.remainder();
        let mut words = words.iter();
        // `chunks` first: `zip` takes no word once the chunks are done.
        for (chunk, word) in chunks.zip(words.by_ref()) {
            let eight: [u8; 8] = chunk.try_into().unwrap_or_default();
            word.store(u64::from_ne_bytes(eight), Ordering::Relaxed);
        }
        if !rest.is_empty()
            && let Some(word) = words.next()
        {
            let mut eight = [0u8; 8];
            eight[..rest.len()].copy_from_slice(rest);
            word.store(u64::from_ne_bytes(eight), Ordering::Relaxed);
        }
    }

    /// Copies `len` bytes (checked: at most [`SLOT`]) out of slot `slot` into `out`.
    fn take(&self, slot: usize, len: usize, out: &mut Vec<u8>) -> bool {
        if len > SLOT {
            return false;
        }
        let words = &self.slots()[slot * SLOT_WORDS..slot * SLOT_WORDS + len.div_ceil(8)];
        out.clear();
        out.resize(len.div_ceil(8) * 8, 0);
        for (word, chunk) in words.iter().zip(out.chunks_exact_mut(8)) {
            chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_ne_bytes());
        }
        out.truncate(len);
        true
    }

    /// Sleeps on header word `index` while it holds `seen`, at most `timeout`, telling the other
    /// side through `sleeping`. Returns at once if the word changed; may return early.
    fn sleep(&self, index: usize, sleeping: usize, seen: u32, timeout: Duration) {
        let word = self.word(index);
        self.word(sleeping).store(1, Ordering::SeqCst);
        if word.load(Ordering::SeqCst) != seen {
            return;
        }
        let timeout = rustix::thread::futex::Timespec::try_from(timeout).unwrap_or(
            rustix::thread::futex::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            },
        );
        // Shared, not private: the other process wakes this word through its own mapping.
        // EAGAIN (changed), ETIMEDOUT, EINTR: the caller looks again either way.
        let _ = rustix::thread::futex::wait(
            word,
            rustix::thread::futex::Flags::empty(),
            seen,
            Some(&timeout),
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

    /// Puts request `seq` (its whole frame, at most [`SLOT`] bytes) in and wakes the child.
    pub(crate) fn request(&self, seq: u32, frame: &[u8]) {
        self.put(0, frame);
        self.word(REQ_LEN)
            .store(frame.len() as u32, Ordering::Relaxed);
        self.publish(REQ_SEQ, CHILD_SLEEPING, seq);
    }

    /// The answer to request `seq`, when the child says it is in: `Answer::Here` with its
    /// frame's bytes copied into `out` (to be parsed and checked still: they are the
    /// child's), `Answer::OnThePipe`, or `Answer::Invalid` for a length no slot holds.
    pub(crate) fn answer(&self, seq: u32, out: &mut Vec<u8>) -> Answer {
        if self.word(ANS_SEQ).load(Ordering::Acquire) != seq {
            return Answer::NotYet;
        }
        match self.word(ANS_LEN).load(Ordering::Acquire) {
            ON_THE_PIPE => Answer::OnThePipe,
            len if self.take(1, len as usize, out) => Answer::Here,
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
        self.sleep(ANS_SEQ, HOST_SLEEPING, seen, timeout);
    }

    /// Wakes every caller sleeping on the answer (the child ended): the number changes, so a
    /// caller about to sleep does not.
    pub(crate) fn wake_host(&self) {
        let word = self.word(ANS_SEQ);
        word.fetch_add(1 << 31, Ordering::SeqCst);
        let _ = rustix::thread::futex::wake(word, rustix::thread::futex::Flags::empty(), u32::MAX);
    }

    // The child's side.

    /// Waits for a request after `last` (at most [`TICK`]); its sequence number and its frame's
    /// bytes in `out`, or `None`.
    pub(crate) fn next_request(&self, last: u32, out: &mut Vec<u8>) -> Option<u32> {
        let mut seq = self.word(REQ_SEQ).load(Ordering::SeqCst);
        if seq == last {
            self.sleep(REQ_SEQ, CHILD_SLEEPING, last, TICK);
            seq = self.word(REQ_SEQ).load(Ordering::SeqCst);
            if seq == last {
                return None;
            }
        }
        let len = self.word(REQ_LEN).load(Ordering::Relaxed) as usize;
        // A request that is not whole is answered by nothing: the host's deadline ends it.
        self.take(0, len, out).then_some(seq)
    }

    /// Answers request `seq` with `frame` (at most [`SLOT`] bytes) and wakes the host.
    pub(crate) fn answer_here(&self, seq: u32, frame: &[u8]) {
        self.put(1, frame);
        self.word(ANS_LEN)
            .store(frame.len() as u32, Ordering::Relaxed);
        self.publish(ANS_SEQ, HOST_SLEEPING, seq);
    }

    /// Says that request `seq`'s answer is (or will be) on the answer pipe, and wakes the host.
    pub(crate) fn answer_on_the_pipe(&self, seq: u32) {
        self.word(ANS_LEN).store(ON_THE_PIPE, Ordering::Relaxed);
        self.publish(ANS_SEQ, HOST_SLEEPING, seq);
    }
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

    fn pair() -> (Region, Region) {
        let (host, fd) = Region::create().unwrap();
        let child = Region::open(&fd).unwrap();
        (host, child)
    }

    #[test]
    fn a_request_and_its_answer_go_through_both_mappings() {
        let (host, child) = pair();
        let mut bytes = Vec::new();
        assert_eq!(
            child.next_request(0, &mut bytes),
            None,
            "nothing yet, after a tick"
        );
        host.request(1, b"hello, child");
        assert_eq!(child.next_request(0, &mut bytes), Some(1));
        assert_eq!(bytes, b"hello, child");
        assert_eq!(host.answer(1, &mut bytes), Answer::NotYet);
        let big = vec![7u8; SLOT];
        child.answer_here(1, &big);
        assert_eq!(host.answer(1, &mut bytes), Answer::Here);
        assert_eq!(bytes, big);
        host.request(2, b"again");
        assert_eq!(child.next_request(1, &mut bytes), Some(2));
        child.answer_on_the_pipe(2);
        assert_eq!(host.answer(2, &mut bytes), Answer::OnThePipe);
        assert_eq!(host.answer(3, &mut bytes), Answer::NotYet);
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
        let mut bytes = Vec::new();
        for len in [SLOT as u32 + 1, u32::MAX - 1, 1 << 31] {
            child.word(ANS_LEN).store(len, Ordering::Relaxed);
            child.word(ANS_SEQ).store(5, Ordering::SeqCst);
            assert_eq!(host.answer(5, &mut bytes), Answer::Invalid, "length {len}");
            assert!(bytes.capacity() <= SLOT + 8);
        }
        child.word(ANS_LEN).store(3, Ordering::Relaxed);
        assert_eq!(
            host.answer(4, &mut bytes),
            Answer::NotYet,
            "another request's number"
        );
        // A scribbled request length on the child's side: no request, nothing read.
        host.word(REQ_LEN).store(u32::MAX, Ordering::Relaxed);
        host.word(REQ_SEQ).store(9, Ordering::SeqCst);
        assert_eq!(child.next_request(0, &mut bytes), None);
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
        let mut bytes = Vec::new();
        assert_eq!(host.answer(1, &mut bytes), Answer::NotYet);
        let started = std::time::Instant::now();
        host.wait_answer(seen, Duration::from_secs(30));
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no sleep once woken"
        );
    }
}
