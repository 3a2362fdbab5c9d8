//! A bound on what one API response can make the agent buffer. kube-rs reads a list response
//! whole, and a watch stream line by line with no limit on a line, before anything is decoded:
//! one oversized object (a misbehaving or hostile API server, or a proxy in between) would be
//! held in memory however large it is. [`LineLimited`] wraps every response body and fails it
//! once a line (one list document, one watch event) passes the limit; the watcher then reports
//! the error and retries with its backoff, and the datapath keeps the state it has, as during
//! any other API outage.
//!
//! The default, 64 MiB, is far above what a real cluster sends (the API server refuses objects
//! over 1.5 MiB, etcd's request limit, and a list of 100,000 endpoints is about 20 MB), and well
//! below the DaemonSet's memory limit: a line is held whole and then decoded beside the agent's
//! heap and the maps charged to the same cgroup, so it is kept to at most a quarter of that
//! limit (checked by `tests/tests/integration/deploy_manifests.rs`).

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// Errors of a wrapped body (what kube-rs's stack passes around).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The default limit on one response line, in MiB.
pub const DEFAULT_MAX_LINE_MIB: u32 = 64;

/// A response line over the limit.
#[derive(Debug, thiserror::Error)]
#[error(
    "an API server response line (one list, or one watch event) passed {max} bytes \
     (--api-max-response-mib); the response is refused and the watch retried"
)]
pub struct LineTooLong {
    /// The limit, in bytes.
    pub max: usize,
}

/// A body that fails once more than `max` bytes arrive without a newline.
pub struct LineLimited<B> {
    inner: B,
    /// Bytes of the current line so far.
    run: usize,
    max: usize,
}

impl<B> LineLimited<B> {
    /// Wraps `inner`.
    pub const fn new(inner: B, max: usize) -> Self {
        Self { inner, run: 0, max }
    }

    /// Accounts for one chunk: whether every line in it stays within the limit.
    fn admit(&mut self, data: &[u8]) -> bool {
        let mut lines = data.split(|b| *b == b'\n');
        // The first piece continues the current line; every later piece starts a new one.
        let mut run = self.run + lines.next().map_or(0, <[u8]>::len);
        for piece in lines {
            if run > self.max {
                break;
            }
            run = piece.len();
        }
        self.run = run;
        run <= self.max
    }
}

impl<B> Body for LineLimited<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && !this.admit(data)
                {
                    return Poll::Ready(Some(Err(Box::new(LineTooLong { max: this.max }))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, convert::Infallible};

    use super::*;

    /// A body of the given chunks.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    /// Reads the wrapped body to its end: the bytes, or the error.
    fn read(chunks: &[&str], max: usize) -> Result<String, String> {
        let mut body = LineLimited::new(
            Chunks(chunks.iter().map(|c| Bytes::copy_from_slice(c.as_bytes())).collect()),
            max,
        );
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut out = String::new();
        loop {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(f))) => out.push_str(std::str::from_utf8(f.data_ref().unwrap()).unwrap()),
                Poll::Ready(Some(Err(e))) => return Err(e.to_string()),
                Poll::Ready(None) => return Ok(out),
                Poll::Pending => unreachable!("the test body is always ready"),
            }
        }
    }

    #[test]
    fn lines_within_the_limit_pass_whole() {
        let chunks = ["{\"a\":1}\n{\"b\"", ":2}\n", "{\"c\":3}", "\n"];
        assert_eq!(read(&chunks, 7).unwrap(), chunks.concat());
        // A list response: one document, no newline at all.
        assert_eq!(read(&["0123", "4567"], 8).unwrap(), "01234567");
    }

    #[test]
    fn a_line_over_the_limit_fails_the_body() {
        // Across chunks, without a newline.
        let e = read(&["0123", "4567", "8"], 8).unwrap_err();
        assert!(e.contains("passed 8 bytes"), "{e}");
        // Ended by a newline, but already too long.
        assert!(read(&["01234", "5678\nok\n"], 8).is_err());
        // In the middle of one chunk.
        assert!(read(&["ok\n0123456789\nok\n"], 8).is_err());
        // The newline resets the count.
        assert!(read(&["01234567\n", "01234567\n"], 8).is_ok());
    }
}
