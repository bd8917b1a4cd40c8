//! Staying awake for a frame that is about to arrive, instead of sleeping in the event loop.
//!
//! On these VMs a process that sleeps in `epoll_wait` and is woken from another core costs about
//! 25 µs before it runs (the idle core must be woken), and two such wake-ups per round trip are
//! most of a 50 µs Resolve. When an answer (or, for a provider, the next request) is expected
//! within microseconds, the reader first polls for up to [`STAY_AWAKE`] without sleeping: each
//! turn yields the OS thread (so a peer sharing this core runs at once) and the task (so the
//! runtime checks its sockets without blocking and runs every other ready task), then looks
//! again. It is what Go's scheduler does with its spinning threads, bounded and backed off.
//!
//! When a yield gives the CPU away (another task, most likely the peer, shares this core), it
//! stops polling and sleeps, and counts the wait as a miss: on a shared core, sleeping wakes no
//! other core and polling only takes time from the peer.
//!
//! Only on a current-thread runtime (the SDK's, and a client's such as `keyhole-bench`'s): on a
//! multi-thread runtime a yielding worker polls the sockets only if no other worker is asleep in
//! `epoll_wait` holding the driver, so the answer would still wake that worker's core while this
//! one burned its time. There it waits the ordinary way.

use std::task::Poll;
use std::time::Duration;

use tokio::io::AsyncRead;

use crate::framed::{FrameReader, RawFrame, ReadError};

/// The environment variable that turns staying awake off in a process: `off`, `0`, `false` or
/// `no` (any case). Then every wait sleeps in the event loop, which costs a cross-core wake-up
/// per frame but no polling: for laptops on battery, or hosts whose every core is busy. The
/// gateway passes its environment on to the providers it spawns.
pub const STAY_AWAKE_ENV: &str = "KEYHOLE_STAY_AWAKE";

/// Whether `value` (of [`STAY_AWAKE_ENV`]) turns staying awake off.
fn switched_off(value: Option<&str>) -> bool {
    value.is_some_and(|v| {
        ["off", "0", "false", "no"]
            .iter()
            .any(|off| v.trim().eq_ignore_ascii_case(off))
    })
}

/// How long a reader stays awake before it sleeps. A provider answers a cached resolve well
/// within this; waking a sleeping core costs a good part of it.
pub const STAY_AWAKE: Duration = Duration::from_micros(100);

/// A `sched_yield` that returns later than this ran another task on this core meanwhile.
const SHARED_CORE: Duration = Duration::from_micros(3);

/// Longest run of waits skipped after misses.
const MAX_BACKOFF: u32 = 64;

/// When staying awake pays. It is tried whenever the caller says a frame is due; after each time
/// the frame did not come in time, it is skipped for twice as many waits as before (up to 64),
/// so a slow peer (a remote vault, a disk write, an idle gateway) costs at most one wasted
/// [`STAY_AWAKE`] per 64 waits.
#[derive(Debug)]
pub struct StayAwake {
    enabled: bool,
    skip: u32,
    backoff: u32,
}

impl Default for StayAwake {
    /// Enabled when created on a current-thread tokio runtime, unless [`STAY_AWAKE_ENV`] turns
    /// it off.
    fn default() -> StayAwake {
        use tokio::runtime::{Handle, RuntimeFlavor};
        StayAwake {
            enabled: Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::CurrentThread)
                && !switched_off(std::env::var(STAY_AWAKE_ENV).ok().as_deref()),
            skip: 0,
            backoff: 0,
        }
    }
}

impl StayAwake {
    /// The next frame from `reader`; if `due` (a frame is expected soon) and recent waits paid,
    /// polls for it without sleeping for up to [`STAY_AWAKE`] first.
    pub async fn next<'a, R: AsyncRead + Unpin>(
        &mut self,
        reader: &'a mut FrameReader<R>,
        due: bool,
    ) -> Result<Option<RawFrame<'a>>, ReadError> {
        if !self.enabled || !due || !self.should_try() {
            return reader.next().await;
        }
        // Real time, not tokio's clock: under a paused test clock this loop never lets the
        // runtime idle, so tokio's time would never reach the bound.
        let until = std::time::Instant::now() + STAY_AWAKE;
        let mut next = std::pin::pin!(reader.next());
        loop {
            let polled = std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await;
            if let Poll::Ready(result) = polled {
                self.record(true);
                return result;
            }
            if std::time::Instant::now() >= until {
                self.record(false);
                return next.await;
            }
            // A yield that gave the CPU away for a while means another task shares this core,
            // most likely the peer: then sleeping costs nothing, and polling only slows it down.
            let yielded = std::time::Instant::now();
            std::thread::yield_now();
            if yielded.elapsed() >= SHARED_CORE {
                self.record(false);
                return next.await;
            }
            tokio::task::yield_now().await;
        }
    }

    fn should_try(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    fn record(&mut self, in_time: bool) {
        if in_time {
            self.backoff = 0;
        } else {
            self.backoff = (self.backoff * 2).clamp(1, MAX_BACKOFF);
            self.skip = self.backoff;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyhole_protocol::Encoding;

    #[test]
    fn the_switch_reads_off_words_in_any_case_and_nothing_else() {
        for off in ["off", "OFF", " 0 ", "false", "No"] {
            assert!(switched_off(Some(off)), "{off:?}");
        }
        for on in [None, Some(""), Some("on"), Some("1"), Some("offline")] {
            assert!(!switched_off(on), "{on:?}");
        }
    }

    async fn pair() -> (
        FrameReader<tokio::io::DuplexStream>,
        crate::FrameWriter<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 16);
        (
            FrameReader::new(a, 1 << 16),
            crate::FrameWriter::new(b, 1, Encoding::Json, 1 << 16),
        )
    }

    async fn send(writer: &mut crate::FrameWriter<tokio::io::DuplexStream>, msg: &str) {
        writer.queue(&msg).expect("queue");
        writer.flush().await.expect("flush");
    }

    /// The payload of the next frame, read with a frame due.
    async fn due(
        awake: &mut StayAwake,
        reader: &mut FrameReader<tokio::io::DuplexStream>,
    ) -> Vec<u8> {
        let frame = awake
            .next(reader, true)
            .await
            .expect("read")
            .expect("a frame");
        frame.payload.to_vec()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_multi_thread_runtime_waits_the_ordinary_way() {
        let (mut reader, mut writer) = pair().await;
        let mut awake = StayAwake::default();
        assert!(!awake.enabled);
        send(&mut writer, "x").await;
        assert_eq!(due(&mut awake, &mut reader).await, b"\"x\"");
    }

    #[tokio::test]
    async fn a_frame_that_comes_in_time_is_a_hit_and_a_late_one_is_still_read() {
        let (mut reader, mut writer) = pair().await;
        let mut awake = StayAwake::default();
        send(&mut writer, "soon").await;
        assert_eq!(due(&mut awake, &mut reader).await, b"\"soon\"");
        assert_eq!(awake.backoff, 0, "in time");

        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            send(&mut writer, "late").await;
            writer
        });
        let payload = tokio::time::timeout(Duration::from_secs(5), due(&mut awake, &mut reader))
            .await
            .expect("within the deadline");
        assert_eq!(payload, b"\"late\"", "a frame after the window is not lost");
        assert_eq!(awake.backoff, 1, "a miss backs off");
        drop(late.await.expect("writer"));
    }

    #[tokio::test(start_paused = true)]
    async fn under_a_paused_test_clock_the_wait_still_ends_and_sleeps() {
        // Staying awake keeps the runtime busy, so a paused clock cannot advance meanwhile; the
        // bound is real time, so the reader still gives up, sleeps, and the clock moves on.
        let (mut reader, mut writer) = pair().await;
        let mut awake = StayAwake::default();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            send(&mut writer, "an hour later").await;
            writer
        });
        assert_eq!(due(&mut awake, &mut reader).await, b"\"an hour later\"");
        drop(late.await.expect("writer"));
    }

    #[test]
    fn misses_back_off_exponentially_and_a_hit_resets() {
        let mut a = StayAwake::default(); // no runtime here: disabled, but the policy is the same
        assert!(a.should_try());
        a.record(false);
        let skipped = |a: &mut StayAwake| (0..200).take_while(|_| !a.should_try()).count();
        assert_eq!(skipped(&mut a), 1);
        a.record(false);
        assert_eq!(skipped(&mut a), 2);
        a.record(false);
        assert_eq!(skipped(&mut a), 4);
        for _ in 0..10 {
            a.record(false);
            let _ = skipped(&mut a);
        }
        a.record(false);
        assert_eq!(skipped(&mut a), MAX_BACKOFF as usize, "capped");
        a.record(true);
        assert!(a.should_try(), "a hit tries again at once");
    }
}
