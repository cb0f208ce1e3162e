//! Property tests of the verification policy against hostile input: any
//! bytes, and valid envelopes with bytes flipped. The properties: nothing
//! panics, and nothing but the signed manifest is ever accepted.
//!
//! (Coverage-guided fuzzing with cargo-fuzz needs a nightly toolchain this
//! project's machines do not have; these run on stable, in CI, bounded.)

use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use reload_artifact::{Envelope, Manifest, SigningKey, TrustedKeys};

fn setup() -> (TrustedKeys, Manifest, Vec<u8>) {
    let key = SigningKey::generate();
    let now = SystemTime::now();
    let manifest = Manifest::new(
        "web",
        "1.4",
        &"ab".repeat(32),
        1234,
        now,
        Duration::from_secs(3600),
    )
    .unwrap();
    let envelope = Envelope::sign_manifest(&manifest, &[&key]).to_json();
    (
        TrustedKeys::new([key.public()], Duration::ZERO),
        manifest,
        envelope,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_refused_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let (trusted, _, _) = setup();
        prop_assert!(trusted.verify_envelope(&bytes, SystemTime::now()).is_err());
    }

    #[test]
    fn a_changed_envelope_never_yields_another_manifest(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4)
    ) {
        let (trusted, manifest, mut envelope) = setup();
        for (index, xor) in flips {
            let i = index.index(envelope.len());
            envelope[i] ^= xor;
        }
        // Some changes are harmless (white space, key order): then the
        // result must be the very manifest that was signed.
        if let Ok(verified) = trusted.verify_envelope(&envelope, SystemTime::now()) {
            prop_assert_eq!(verified.manifest, manifest);
        }
    }
}
