//! DSSE, the Dead Simple Signing Envelope (in-toto / Sigstore):
//! `{"payloadType", "payload" (base64), "signatures": [{"keyid", "sig"}]}`,
//! each signature made over the pre-authentication encoding (PAE) of type and
//! payload, never over the JSON, so no JSON canonicalization is needed and
//! the payload type cannot be swapped.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::keys::SigningKey;
use crate::manifest::Manifest;

/// The payload type of a reload manifest.
pub const PAYLOAD_TYPE: &str = "application/vnd.reload.manifest.v1+json";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub payload_type: String,
    /// Standard base64 of the payload bytes.
    pub payload: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnvelopeSignature {
    /// Key id of the signer (a hint: verification uses the trusted key).
    #[serde(default)]
    pub keyid: String,
    /// Standard base64 of the 64-byte Ed25519 signature.
    pub sig: String,
}

/// PAE(type, body) = "DSSEv1" SP len(type) SP type SP len(body) SP body.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    /// Signs `payload` of `payload_type` with every key given.
    pub fn sign_payload(payload_type: &str, payload: &[u8], keys: &[&SigningKey]) -> Envelope {
        let message = pae(payload_type, payload);
        Envelope {
            payload_type: payload_type.to_string(),
            payload: BASE64.encode(payload),
            signatures: keys
                .iter()
                .map(|key| EnvelopeSignature {
                    keyid: key.id().to_string(),
                    sig: BASE64.encode(key.sign(&message)),
                })
                .collect(),
        }
    }

    /// Signs a manifest: its JSON is the payload.
    pub fn sign_manifest(manifest: &Manifest, keys: &[&SigningKey]) -> Envelope {
        let payload =
            serde_json::to_vec_pretty(manifest).expect("a manifest always serializes to JSON");
        Envelope::sign_payload(PAYLOAD_TYPE, &payload, keys)
    }

    /// The manifest inside, WITHOUT checking any signature. Only for
    /// envelopes that were verified before (the agent's own store) or whose
    /// check happens elsewhere (the CLI reads the sha256 to skip an upload;
    /// the agent verifies what is sent).
    pub fn unverified_manifest(&self) -> Result<Manifest, String> {
        let payload = BASE64
            .decode(self.payload.as_bytes())
            .map_err(|err| format!("payload is not base64: {err}"))?;
        serde_json::from_slice(&payload).map_err(|err| format!("payload is not a manifest: {err}"))
    }

    /// The JSON file `reloadctl sign` writes.
    pub fn to_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("an envelope always serializes");
        bytes.push(b'\n');
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::pae;

    #[test]
    fn pae_matches_the_dsse_spec_example() {
        // From the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }
}
