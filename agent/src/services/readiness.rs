//! When a new process counts as ready: `READY=1` on its own notify socket
//! (the default: only the new process knows that socket), a TCP connect or
//! an HTTP GET on an explicit address, or a plain delay for programs that
//! can do none of these. Also the one HTTP GET the agent makes, shared with
//! the steady-state health probes.
//!
//! A TCP or HTTP probe on the *shared* listening socket proves nothing
//! during a reload: the old process, which accepts from the same queue,
//! answers it. Those probes therefore take an address of their own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::config::Readiness;

/// Waits until the readiness condition holds. Never returns otherwise; the
/// caller bounds it with the readiness timeout and the process's exit.
pub(super) async fn wait_ready(readiness: &Readiness, notify: Option<&tokio::net::UnixDatagram>) {
    match readiness {
        Readiness::Notify => {
            let socket = notify.expect("a notify socket is made for notify readiness");
            if reload_server::notify::recv_ready(socket).await.is_err() {
                // The socket broke: only the timeout or the exit ends this.
                std::future::pending::<()>().await;
            }
        }
        Readiness::Delay { delay } => tokio::time::sleep(*delay).await,
        Readiness::Tcp { address } => loop {
            if tokio::net::TcpStream::connect(address).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        },
        Readiness::Http { address, path } => loop {
            if http_get_ok(*address, path, Duration::from_secs(2)).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        },
    }
}

/// The readiness condition, for failure reasons.
pub(super) fn describe_readiness(readiness: &Readiness) -> String {
    match readiness {
        Readiness::Notify => "READY=1 on NOTIFY_SOCKET".into(),
        Readiness::Delay { delay } => format!("delay {}", humantime::format_duration(*delay)),
        Readiness::Tcp { address } => format!("tcp connect to {address}"),
        Readiness::Http { address, path } => format!("http GET {address}{path}"),
    }
}

/// GET `path` on `address`; true on a 2xx answer within `timeout`. Plain
/// HTTP/1.1 through hyper's client connection: no pool, no retry, so a
/// failure is seen as a failure.
pub async fn http_get_ok(address: SocketAddr, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, address.to_string())
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        Some(response.status().is_success())
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

/// A per-spawn notify socket's path, removed when the spawn it belongs to
/// is over (the socket stays open meanwhile so `STOPPING=1` and `STATUS=`
/// still reach it while the process drains).
pub(super) struct NotifyPath(pub(super) PathBuf);

impl Drop for NotifyPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
