//! The HTTP(S) client of `FetchArtifact`: one GET of a release file from an
//! artifact repository (S3-compatible stores, Artifactory, GitHub releases,
//! plain nginx), from a given byte on (a Range request, to resume a fetch
//! cut short), following a few redirects.
//!
//! The repository is not trusted: the signed manifest pins the file's
//! sha256 and size and the store checks both (see
//! [`crate::api`]'s `fetch`). What is guarded here is the agent itself:
//! only URLs under an operator's `[fetch] allow` prefixes are opened (a
//! deploy identity must not be able to make the agent reach any address
//! of its network), every wait is bounded, and nothing the repository
//! says is echoed to clients beyond its status line.

use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::FetchConfig;

/// Redirects followed (GitHub releases and presigned S3 URLs use one).
const MAX_REDIRECTS: usize = 5;

/// Why a fetch failed, before any byte of the file was judged.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Not under an allowed prefix, or not http(s): FAILED_PRECONDITION.
    #[error("{0}")]
    NotAllowed(String),
    /// Could not connect, or an HTTP error: UNAVAILABLE.
    #[error("{0}")]
    Unavailable(String),
    /// Nothing within the idle timeout: DEADLINE_EXCEEDED.
    #[error("{0}")]
    TimedOut(String),
}

/// The repository client, built once from `[fetch]`.
pub struct Fetcher {
    allow: Vec<String>,
    tls: Arc<rustls::ClientConfig>,
}

/// A repository's answer to a GET: its body, and whether it starts at the
/// byte asked for (206) or at the beginning of the file (200).
pub struct Fetched {
    pub body: Incoming,
    pub from: u64,
    /// The URL the body came from, after redirects.
    pub url: String,
}

impl Fetcher {
    pub fn new(config: &FetchConfig) -> anyhow::Result<Fetcher> {
        use anyhow::Context;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        match &config.ca {
            Some(pem) => {
                for ca in CertificateDer::pem_slice_iter(pem) {
                    roots
                        .add(ca.context("[fetch] ca is not PEM certificates")?)
                        .context("[fetch] ca")?;
                }
            }
            // The host's trusted roots, read only when there is somewhere to
            // fetch from (a host without a CA bundle may never fetch).
            None if !config.allow.is_empty() => {
                let found = rustls_native_certs::load_native_certs();
                for ca in found.certs {
                    let _ = roots.add(ca);
                }
                if roots.is_empty() {
                    tracing::warn!(errors = ?found.errors, "no trusted root certificates found on this host: https repositories need [fetch] ca");
                }
            }
            None => {}
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Fetcher {
            allow: config.allow.clone(),
            tls: Arc::new(tls),
        })
    }

    /// Refuses a URL that is not under an allowed prefix.
    pub fn check_allowed(&self, url: &str) -> Result<(), FetchError> {
        if self.allow.is_empty() {
            return Err(FetchError::NotAllowed(
                "this agent fetches from no repository: add the repository's URL prefix to [fetch] allow in its config".into(),
            ));
        }
        if !self.allow.iter().any(|prefix| url.starts_with(prefix)) {
            return Err(FetchError::NotAllowed(format!(
                "{url} is under none of this agent's [fetch] allow prefixes ({}): fix the URL, or add its prefix there",
                self.allow.join(", ")
            )));
        }
        Ok(())
    }

    /// GETs `url` from byte `from` on (no Range header when 0), each step
    /// (connect, TLS, the response head) within `idle`.
    pub async fn get(&self, url: &str, from: u64, idle: Duration) -> Result<Fetched, FetchError> {
        self.check_allowed(url)?;
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let response = self.get_once(&url, from, idle).await?;
            let status = response.status();
            if status.is_redirection() {
                let location = response
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .ok_or_else(|| {
                        FetchError::Unavailable(format!(
                            "{url} answered {status} without a Location"
                        ))
                    })?;
                url = resolve(&url, location)?;
                continue;
            }
            return match status {
                StatusCode::OK => Ok(Fetched {
                    body: response.into_body(),
                    from: 0,
                    url,
                }),
                StatusCode::PARTIAL_CONTENT => {
                    // "bytes START-END/TOTAL": anything but our start means
                    // the repository did not do what was asked.
                    let start = response
                        .headers()
                        .get(header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("bytes "))
                        .and_then(|v| v.split('-').next())
                        .and_then(|v| v.parse::<u64>().ok());
                    if start != Some(from) {
                        return Err(FetchError::Unavailable(format!(
                            "{url} answered a range request for bytes {from}- with Content-Range {:?}",
                            response.headers().get(header::CONTENT_RANGE)
                        )));
                    }
                    Ok(Fetched {
                        body: response.into_body(),
                        from,
                        url,
                    })
                }
                other if other == StatusCode::RANGE_NOT_SATISFIABLE => {
                    Err(FetchError::Unavailable(format!(
                        "{url} answered {other} to a request from byte {from} on: its file is shorter than the bytes already fetched"
                    )))
                }
                other => Err(FetchError::Unavailable(format!("{url} answered {other}"))),
            };
        }
        Err(FetchError::Unavailable(format!(
            "more than {MAX_REDIRECTS} redirects from {url}"
        )))
    }

    async fn get_once(
        &self,
        url: &str,
        from: u64,
        idle: Duration,
    ) -> Result<hyper::Response<Incoming>, FetchError> {
        let uri: Uri = url
            .parse()
            .map_err(|err| FetchError::NotAllowed(format!("{url} is not a URL: {err}")))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(FetchError::NotAllowed(format!(
                    "{url}: only http:// and https:// repositories are fetched from"
                )))
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| FetchError::NotAllowed(format!("{url} names no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let timed = |what: String| move |_| FetchError::TimedOut(what);
        let unavailable = |what: String| {
            move |err: std::io::Error| FetchError::Unavailable(format!("{what}: {err}"))
        };
        let tcp = tokio::time::timeout(idle, TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(timed(format!(
                "no connection to {host}:{port} within {idle:?}"
            )))?
            .map_err(unavailable(format!("cannot connect to {host}:{port}")))?;
        let _ = tcp.set_nodelay(true);
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_else(|| host.clone());
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let mut request = Request::get(path).header(header::HOST, authority).header(
            header::USER_AGENT,
            concat!("reload-agent/", env!("CARGO_PKG_VERSION")),
        );
        if from > 0 {
            request = request.header(header::RANGE, format!("bytes={from}-"));
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|err| FetchError::NotAllowed(format!("{url}: {err}")))?;
        let send = async {
            if https {
                let name =
                    rustls::pki_types::ServerName::try_from(host.clone()).map_err(|err| {
                        FetchError::NotAllowed(format!(
                            "{url}: {host} is not a TLS server name: {err}"
                        ))
                    })?;
                let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(unavailable(format!("TLS with {host}:{port} failed")))?;
                send(TokioIo::new(tls), request, url).await
            } else {
                send(TokioIo::new(tcp), request, url).await
            }
        };
        tokio::time::timeout(idle, send)
            .await
            .map_err(timed(format!("{url} sent no response within {idle:?}")))?
    }
}

/// One request on a fresh HTTP/1.1 connection; the connection is driven
/// on a task of its own until the body is read (or dropped).
async fn send<T>(
    io: TokioIo<T>,
    request: Request<Empty<Bytes>>,
    url: &str,
) -> Result<hyper::Response<Incoming>, FetchError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|err| FetchError::Unavailable(format!("{url}: {err}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
        .send_request(request)
        .await
        .map_err(|err| FetchError::Unavailable(format!("{url}: {err}")))
}

/// `location` (absolute, or a path on the same origin) as an absolute URL.
fn resolve(base: &str, location: &str) -> Result<String, FetchError> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return Ok(location.to_string());
    }
    let uri: Uri = base
        .parse()
        .map_err(|err| FetchError::Unavailable(format!("{base}: {err}")))?;
    match (uri.scheme_str(), uri.authority(), location.starts_with('/')) {
        (Some(scheme), Some(authority), true) => Ok(format!("{scheme}://{authority}{location}")),
        _ => Err(FetchError::Unavailable(format!(
            "{base} redirected to {location:?}, which is neither a URL nor an absolute path"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetcher(allow: &[&str]) -> Fetcher {
        Fetcher::new(&FetchConfig {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            ca: None,
            peers: None,
        })
        .unwrap()
    }

    #[test]
    fn only_urls_under_an_allowed_prefix_are_fetched() {
        let none = fetcher(&[]);
        let err = none.check_allowed("http://127.0.0.1/web").unwrap_err();
        assert!(err.to_string().contains("[fetch] allow"), "{err}");
        let some = fetcher(&["https://artifacts.example.com/releases/"]);
        assert!(some
            .check_allowed("https://artifacts.example.com/releases/web-1.5.0")
            .is_ok());
        for url in [
            "https://artifacts.example.com.evil/releases/web",
            "http://artifacts.example.com/releases/web",
            "https://artifacts.example.com/other/web",
        ] {
            assert!(some.check_allowed(url).is_err(), "{url}");
        }
    }

    #[test]
    fn redirects_resolve_against_their_origin() {
        assert_eq!(
            resolve("https://a.example/x/y", "/z").unwrap(),
            "https://a.example/z"
        );
        assert_eq!(
            resolve("https://a.example/x", "https://b.example/q").unwrap(),
            "https://b.example/q"
        );
        assert!(resolve("https://a.example/x", "relative").is_err());
    }
}
