//! `reloadctl certs`: a development CA with an agent and a client
//! certificate, for mutual TLS between `reloadctl` and the agents.
//!
//! For production, use your own PKI: the agent only needs a CA file to check
//! client certificates against, and its own certificate and key.

use std::path::Path;

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::write_atomically;

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn leaf(
    names: &[String],
    common_name: &str,
    usages: &[ExtendedKeyUsagePurpose],
    issuer: &Issuer<'_, &KeyPair>,
) -> anyhow::Result<(String, String)> {
    let mut params = CertificateParams::new(names.to_vec()).with_context(|| {
        format!("{names:?} holds a name that is not a DNS name or an IP address")
    })?;
    params.distinguished_name = dn(common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = usages.to_vec();
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

pub fn make_certs(
    out: &Path,
    agent_names: &[String],
    clients: &[String],
    force: bool,
) -> anyhow::Result<()> {
    if agent_names.is_empty() || clients.is_empty() {
        bail!("give at least one --agent-name and one --client");
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = dn("reload development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    write_atomically(&out.join("ca.pem"), ca_cert.pem().as_bytes(), 0o644, force)?;
    write_atomically(
        &out.join("ca.key"),
        ca_key.serialize_pem().as_bytes(),
        0o600,
        force,
    )?;
    // Client use too: an agent fetching a release from another agent
    // (`[fetch] peers`) presents its own certificate.
    let (cert, key) = leaf(
        agent_names,
        "reload-agent",
        &[
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        &issuer,
    )?;
    write_atomically(&out.join("agent.pem"), cert.as_bytes(), 0o644, force)?;
    write_atomically(&out.join("agent.key"), key.as_bytes(), 0o600, force)?;
    for client in clients {
        reload_artifact::manifest::validate_service_name(client)
            .map_err(|_| anyhow::anyhow!("client name {client:?}: use letters, digits, . _ -"))?;
        let (cert, key) = leaf(
            std::slice::from_ref(client),
            client,
            &[ExtendedKeyUsagePurpose::ClientAuth],
            &issuer,
        )?;
        write_atomically(
            &out.join(format!("{client}.pem")),
            cert.as_bytes(),
            0o644,
            force,
        )?;
        write_atomically(
            &out.join(format!("{client}.key")),
            key.as_bytes(),
            0o600,
            force,
        )?;
    }
    println!("wrote {}: ca.pem (+ ca.key), agent.pem (+ agent.key) for {agent_names:?}, and client certificates for {clients:?}", out.display());
    println!(
        "agent config:  [tls] ca = \"ca.pem\", cert = \"agent.pem\", key = \"agent.key\"; {}",
        suggested_rights(clients)
    );
    println!("reloadctl:     [tls] ca = \"{0}/ca.pem\", cert = \"{0}/{1}.pem\", key = \"{0}/{1}.key\" in reloadctl.toml (or --tls-ca, --tls-cert, --tls-key)", out.display(), clients[0]);
    Ok(())
}

/// The `[rights]` to suggest: the first client deploys (it is the one
/// `reloadctl` is shown with), every other only reads, as the operator's
/// guide has it (`deployer` deploys, `monitor` reads): a monitoring
/// certificate with deploy rights could roll out anything signed.
fn suggested_rights(clients: &[String]) -> String {
    let (deploy, read) = clients.split_at(1);
    if read.is_empty() {
        format!("[rights] deploy = {deploy:?}")
    } else {
        format!("[rights] deploy = {deploy:?}, read = {read:?} (the first --client deploys, the others read; move names as you need)")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_first_client_is_suggested_the_deploy_right() {
        let clients = ["deployer".to_string(), "monitor".to_string()];
        let rights = super::suggested_rights(&clients);
        assert!(
            rights.starts_with("[rights] deploy = [\"deployer\"], read = [\"monitor\"]"),
            "{rights}"
        );
        assert_eq!(
            super::suggested_rights(&clients[..1]),
            "[rights] deploy = [\"deployer\"]"
        );
    }
}
