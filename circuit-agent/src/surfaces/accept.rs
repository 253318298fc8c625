//! The accept loop both listeners share (the HTTP endpoint and the control socket): a cap on
//! connections served at once, over which a new one is closed at once rather than queued,
//! and a pause after a failed accept (EMFILE, ENOBUFS), which would otherwise fail again at
//! once, in a loop, with one warning per spell of failures.

use std::{future::Future, io, sync::Arc, time::Duration};

use tokio::sync::Semaphore;

const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A listener the loop can take connections from.
pub trait Listener: Send + 'static {
    type Stream: Send + 'static;
    fn accept_one(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> io::Result<Self::Stream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Serves every connection `listener` accepts with `serve`, each on its own task, at most
/// `cap` at once, until the runtime ends. `what` names the listener in logs.
pub fn spawn<L, S, F>(what: &'static str, listener: L, cap: usize, serve: S)
where
    L: Listener,
    S: Fn(L::Stream) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(cap));
        let mut failing = false;
        loop {
            let stream = match listener.accept_one().await {
                Ok(stream) => stream,
                Err(err) => {
                    if !failing {
                        tracing::warn!(%err, "{what} cannot accept; retrying every 100ms");
                    }
                    failing = true;
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            failing = false;
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!("{what}: {cap} connections already, closing one more");
                continue;
            };
            let session = serve(stream);
            tokio::spawn(async move {
                let _slot = slot;
                session.await;
            });
        }
    });
}
