//! The HSM layer against a real SoftHSM token (one token per test process: PKCS#11 reads
//! `SOFTHSM2_CONF` once, at `C_Initialize`).

use std::path::PathBuf;
use std::sync::OnceLock;

use dccsign::hsm::{HsmError, KeyUri, PinSource, Token, TokenSettings, SOFTHSM_MODULE};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use secrecy::SecretString;
use sha2::{Digest, Sha256};

struct Fixture {
    _dir: tempfile::TempDir,
    settings: TokenSettings,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        std::env::set_var("SOFTHSM2_CONF", &conf);
        let module = PathBuf::from(SOFTHSM_MODULE);
        Token::initialize(
            &module,
            "hsm-test",
            &SecretString::from("so-pin-1234".to_string()),
            &SecretString::from("user-pin-1234".to_string()),
        )
        .unwrap();
        std::env::set_var("HSM_TEST_PIN", "user-pin-1234");
        Fixture {
            settings: TokenSettings {
                module,
                label: "hsm-test".into(),
                pin: PinSource::Env("HSM_TEST_PIN".into()),
                base_dir: dir.path().to_path_buf(),
            },
            _dir: dir,
        }
    })
}

fn token() -> Token {
    Token::open(&fixture().settings).unwrap()
}

#[test]
fn generated_key_is_sensitive_and_not_extractable() {
    let t = token();
    let k = t.generate_p256("attr-key").unwrap();
    assert_eq!(k.id.len(), 16);
    assert_eq!(t.protection_flags(&k).unwrap(), (true, false));
    assert!(
        !t.private_value_readable(&k).unwrap(),
        "CKA_VALUE must not be readable"
    );
    // Found again by label, with the same public key and id.
    let again = t.find_key("attr-key").unwrap();
    assert_eq!(again.public_key, k.public_key);
    assert_eq!(again.id, k.id);
    let uri: KeyUri = k.uri(&t).to_string().parse().unwrap();
    assert_eq!(uri.object, "attr-key");
    assert_eq!(uri.token, "hsm-test");
}

#[test]
fn label_reuse_is_refused() {
    let t = token();
    t.generate_p256("unique-label").unwrap();
    assert!(matches!(
        t.generate_p256("unique-label"),
        Err(HsmError::KeyExists(_))
    ));
    assert!(matches!(
        t.find_key("no-such-label"),
        Err(HsmError::KeyNotFound(_))
    ));
}

#[test]
fn pool_signatures_verify_with_the_public_key() {
    let t = token();
    let k = t.generate_p256("pool-key").unwrap();
    let pool = t.signing_pool(2, 16).unwrap();
    assert_eq!(pool.size(), 2);
    let vk = p256::ecdsa::VerifyingKey::from(&k.public_key);
    let mut seen = std::collections::HashSet::new();
    for i in 0..50u32 {
        let digest: [u8; 32] = Sha256::digest(i.to_be_bytes()).into();
        let sig = pool.sign(&k, digest).unwrap();
        let sig = p256::ecdsa::Signature::from_slice(&sig).unwrap();
        vk.verify_prehash(&digest, &sig).unwrap();
        // A wrong digest does not verify.
        let mut other = digest;
        other[0] ^= 1;
        assert!(vk.verify_prehash(&other, &sig).is_err());
        seen.insert(sig.to_bytes().to_vec());
    }
    assert_eq!(seen.len(), 50);
}

#[test]
fn pool_signs_with_a_session_copy_that_destroy_removes() {
    let t = token();
    let k = t.generate_p256("copy-key").unwrap();
    assert!(t.session_copies(&k).unwrap().is_empty());
    let pool = t.signing_pool(2, 16).unwrap();
    let vk = p256::ecdsa::VerifyingKey::from(&k.public_key);
    for i in 0..20u32 {
        let digest: [u8; 32] = Sha256::digest(i.to_be_bytes()).into();
        let sig = p256::ecdsa::Signature::from_slice(&pool.sign(&k, digest).unwrap()).unwrap();
        vk.verify_prehash(&digest, &sig).unwrap();
    }
    // One copy for both workers, as protected as the original.
    assert_eq!(t.session_copies(&k).unwrap(), vec![(true, false)]);
    // Lookups by label still see only the token object.
    assert_eq!(
        t.key_labels()
            .unwrap()
            .iter()
            .filter(|l| *l == "copy-key")
            .count(),
        1
    );
    assert_eq!(t.find_key("copy-key").unwrap().id, k.id);
    // Destroying the key destroys its copy first: the pool can no longer sign with it.
    t.destroy_key_pair(&k).unwrap();
    assert!(t.session_copies(&k).unwrap().is_empty());
    assert!(
        pool.sign(&k, [3u8; 32]).is_err(),
        "a destroyed key must not sign through a session copy"
    );
}

#[test]
fn session_copies_can_be_switched_off() {
    let t = token();
    t.set_session_copies(false);
    let k = t.generate_p256("no-copy-key").unwrap();
    let pool = t.signing_pool(1, 4).unwrap();
    let digest = [5u8; 32];
    let sig = p256::ecdsa::Signature::from_slice(&pool.sign(&k, digest).unwrap()).unwrap();
    p256::ecdsa::VerifyingKey::from(&k.public_key)
        .verify_prehash(&digest, &sig)
        .unwrap();
    assert!(t.session_copies(&k).unwrap().is_empty());
}

#[test]
fn pool_submit_replies_from_worker() {
    let t = token();
    let k = t.generate_p256("submit-key").unwrap();
    let pool = t.signing_pool(1, 4).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    pool.submit(&k, [1u8; 32], Box::new(move |r| tx.send(r).unwrap()))
        .unwrap();
    let sig = rx.recv().unwrap().unwrap();
    assert_eq!(sig.len(), 64);
}

#[test]
fn unknown_token_is_reported() {
    // (The wrong-PIN case needs a process that is not logged in yet: see tests/cli.rs.)
    assert!(matches!(
        Token::open(&TokenSettings {
            label: "no-such-token".into(),
            ..fixture().settings.clone()
        }),
        Err(HsmError::TokenNotFound(_))
    ));
}

#[test]
fn hmac_keys_stay_in_the_token_and_are_deterministic() {
    let t = token();
    let k = t.generate_hmac_key("hmac-key").unwrap();
    assert!(matches!(
        t.generate_hmac_key("hmac-key"),
        Err(HsmError::KeyExists(_))
    ));
    let a = t.hmac_sha256(&k, b"client\0request-1").unwrap();
    let again = t
        .hmac_sha256(&t.find_hmac_key("hmac-key").unwrap(), b"client\0request-1")
        .unwrap();
    let b = t.hmac_sha256(&k, b"client\0request-2").unwrap();
    assert_eq!(a, again);
    assert_ne!(a, b);
    let other = t.generate_hmac_key("hmac-key-2").unwrap();
    assert_ne!(t.hmac_sha256(&other, b"client\0request-1").unwrap(), a);
}
