//! The rustls server config of both ports, from the agent's `[tls]` files:
//! the agent's certificate, and mutual TLS (a client certificate that
//! chains to the CA is required to finish a handshake). The gRPC port adds
//! ALPN `h2`, as tonic's own TLS acceptor does; the agent runs the
//! handshake itself so it can bound it in time (see [`super::grpc`]).

use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;

/// The TLS acceptors of the gRPC and the health port.
#[derive(Clone)]
pub struct Acceptors {
    pub grpc: tokio_rustls::TlsAcceptor,
    pub health: tokio_rustls::TlsAcceptor,
}

/// Parses the `[tls]` files (`--check` runs this too, so a broken key is
/// refused before an upgrade or a config reload changes anything).
/// `anonymous_health`: the health port also finishes handshakes with
/// clients that present no certificate (`[agent] anonymous_health`); what
/// those may read is decided per request (see [`crate::health_http`]).
/// A certificate that is presented must still chain to the CA.
pub fn acceptors(tls: &TlsFiles, anonymous_health: bool) -> anyhow::Result<Acceptors> {
    let health = server_config(tls, anonymous_health)?;
    let mut grpc = server_config(tls, false)?;
    // gRPC is HTTP/2 only; a client that offers ALPN must be able to pick it.
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Acceptors {
        grpc: tokio_rustls::TlsAcceptor::from(Arc::new(grpc)),
        health: tokio_rustls::TlsAcceptor::from(Arc::new(health)),
    })
}

fn server_config(tls: &TlsFiles, anonymous: bool) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(&tls.cert)
        .collect::<Result<Vec<_>, _>>()
        .context("[tls] cert is not PEM certificates")?;
    let key =
        PrivateKeyDer::from_pem_slice(&tls.key).context("[tls] key is not a PEM private key")?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&tls.ca) {
        roots.add(ca.context("[tls] ca is not PEM certificates")?)?;
    }
    // Any certificate from the CA finishes the handshake; what it may do is
    // decided per call by [rights].
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    let verifier = if anonymous {
        verifier.allow_unauthenticated()
    } else {
        verifier
    }
    .build()
    .context("[tls] ca cannot verify client certificates")?;
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("[tls] cert and key do not match")
}
