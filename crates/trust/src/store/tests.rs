//! Tests of the trust store: entries, revocation, join tokens, PKI mode, persistence.

use std::time::{Duration, SystemTime};

use super::*;
use crate::CertKey;
use crate::identity::VALIDITY;

const NOW: u64 = 1_900_000_000;

fn client(cn: &str) -> CertKey {
    let now = SystemTime::now();
    CertKey::self_signed_client(cn, now - Duration::from_secs(60), now + VALIDITY).unwrap()
}

fn open() -> (tempfile::TempDir, TrustStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = TrustStore::open(&dir.path().join("state.db")).unwrap();
    (dir, store)
}

fn server_fp() -> String {
    crate::fingerprint(b"server certificate")
}

#[test]
fn add_list_get_remove() {
    let (_d, s) = open();
    let alice = client("alice@host");
    let bob = client("bob@host");
    let e = s
        .add(alice.cert_pem().as_bytes(), "alice", Role::Admin)
        .unwrap();
    assert_eq!(e.fingerprint, alice.fingerprint());
    assert!(
        e.certificate_pem
            .starts_with("-----BEGIN CERTIFICATE-----\n")
    );
    // DER works as well as PEM.
    s.add(bob.cert_der(), "bob", Role::Auditor).unwrap();
    let names: Vec<_> = s.list().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["alice", "bob"]);

    let err = s
        .add(client("x").cert_der(), "alice", Role::User)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a certificate named \"alice\" is already trusted"),
        "{err}"
    );
    let err = s
        .add(alice.cert_der(), "alice2", Role::User)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "certificate {} is already trusted as \"alice\"",
            alice.fingerprint()
        )),
        "{err}"
    );

    let id = s.identify(alice.cert_der()).unwrap();
    assert_eq!((id.name.as_str(), id.role), ("alice", Role::Admin));
    assert_eq!(id.source, IdentitySource::TrustStore);

    // By fingerprint, in another form; then by name.
    let upper = bob.fingerprint().to_uppercase();
    assert_eq!(s.remove(&upper).unwrap().name, "bob");
    assert_eq!(s.remove("alice").unwrap().name, "alice");
    assert!(s.list().is_empty());
    let err = s.remove("alice").unwrap_err().to_string();
    assert!(err.contains("no trusted certificate has the name or fingerprint \"alice\""));
    assert!(matches!(
        s.authenticate(alice.cert_der()),
        Err(Refusal::Revoked { .. })
    ));
    assert_eq!(s.list_revoked().len(), 2);

    // An explicit add trusts it again.
    s.add(alice.cert_der(), "alice", Role::User).unwrap();
    assert_eq!(s.identify(alice.cert_der()).unwrap().role, Role::User);
    assert_eq!(s.list_revoked().len(), 1);
}

#[test]
fn bad_input_is_refused_precisely() {
    let (_d, s) = open();
    let c = client("c");
    for (name, want) in [
        ("", "empty"),
        ("a b", "only ASCII letters"),
        (&"a".repeat(65)[..], "longer than 64"),
        (&crate::fingerprint(b"x")[..], "read as a fingerprint"),
    ] {
        let e = s
            .add(c.cert_der(), name, Role::User)
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{name}: {e}");
    }
    let e = s
        .add(b"not a cert", "c", Role::User)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an X.509 certificate"), "{e}");
    let now = SystemTime::now();
    let expired = CertKey::self_signed_client(
        "old",
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    )
    .unwrap();
    let e = s
        .add(expired.cert_der(), "old", Role::User)
        .unwrap_err()
        .to_string();
    assert!(e.contains("it has expired"), "{e}");
}

#[test]
fn unknown_and_expired_certificates_are_not_identified() {
    let (_d, s) = open();
    let c = client("c");
    assert_eq!(
        s.authenticate(c.cert_der()),
        Err(Refusal::Untrusted {
            fingerprint: c.fingerprint().to_owned()
        })
    );
    s.add(c.cert_der(), "c", Role::User).unwrap();
    let after_expiry =
        crate::clock::to_unix(SystemTime::now() + VALIDITY + Duration::from_secs(86400));
    assert_eq!(
        s.authenticate_at(c.cert_der(), after_expiry),
        Err(Refusal::Expired)
    );
    assert_eq!(
        s.authenticate_at(c.cert_der(), 0),
        Err(Refusal::NotYetValid)
    );
    assert_eq!(s.authenticate(b"junk"), Err(Refusal::BadCertificate));
}

#[test]
fn revoke_takes_effect_at_once() {
    let (_d, s) = open();
    let c = client("c");
    s.add(c.cert_der(), "c", Role::Operator).unwrap();
    assert!(s.identify(c.cert_der()).is_some());
    let removed = s.revoke(c.fingerprint()).unwrap();
    assert_eq!(removed.map(|e| e.name), Some("c".to_owned()));
    assert!(s.identify(c.cert_der()).is_none());
    // Revoking a fingerprint nobody trusts is allowed (PKI mode) and idempotent.
    assert_eq!(s.revoke(&crate::fingerprint(b"other")).unwrap(), None);
    assert_eq!(s.revoke(c.fingerprint()).unwrap(), None);
    assert!(s.revoke("nope").is_err());
}

#[test]
fn set_role() {
    let (_d, s) = open();
    let c = client("c");
    s.add(c.cert_der(), "c", Role::Auditor).unwrap();
    s.set_role("c", Role::Operator).unwrap();
    assert_eq!(s.identify(c.cert_der()).unwrap().role, Role::Operator);
    assert!(s.set_role("d", Role::User).is_err());
}

#[test]
fn join_token_once_only() {
    let (_d, s) = open();
    let addrs = vec!["198.51.100.201:8443".to_owned()];
    let t = s
        .issue_token_at(
            "carol",
            Role::User,
            Duration::from_secs(600),
            &server_fp(),
            &addrs,
            NOW,
        )
        .unwrap();
    assert_eq!(t.fingerprint, server_fp());
    assert_eq!(t.addresses, addrs);
    assert_eq!(t.expires_at, NOW + 600);
    let decoded = JoinToken::decode(&t.encode()).unwrap();
    assert_eq!(decoded, t);

    // Only the hash of the secret is stored.
    {
        let conn = s.conn().unwrap();
        let stored: String = conn
            .query_row("SELECT secret_sha256 FROM trust_tokens", [], |r| r.get(0))
            .unwrap();
        assert_ne!(stored, t.secret);
        assert_eq!(stored, secret_hash(&t.secret).unwrap());
    }

    let now = SystemTime::now();
    let carol = CertKey::self_signed_client(
        "carol@laptop",
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW - 10),
        now + VALIDITY * 2,
    )
    .unwrap();
    let e = s
        .redeem_token_at(&t.secret, carol.cert_der(), NOW + 1)
        .unwrap();
    assert_eq!((e.name.as_str(), e.role), ("carol", Role::User));
    assert_eq!(e.fingerprint, carol.fingerprint());
    assert_eq!(
        s.authenticate_at(carol.cert_der(), NOW + 2).unwrap().name,
        "carol"
    );

    let other = client("mallory");
    let err = s
        .redeem_token_at(&t.secret, other.cert_der(), NOW + 2)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("the join token for \"carol\" was already used at "),
        "{err}"
    );
    assert!(s.identify(other.cert_der()).is_none());
}

#[test]
fn join_token_expired_unknown_pending() {
    let (_d, s) = open();
    let now = crate::clock::unix_now();
    let t = s
        .issue_token_at(
            "dave",
            Role::Operator,
            Duration::from_secs(60),
            &server_fp(),
            &[],
            now,
        )
        .unwrap();
    let err = s
        .issue_token(
            "dave",
            Role::User,
            Duration::from_secs(60),
            &server_fp(),
            &[],
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a join token for \"dave\" is still pending"),
        "{err}"
    );
    assert_eq!(s.list_tokens().unwrap()[0].name, "dave");

    let c = client("dave");
    let err = s
        .redeem_token_at(&t.secret, c.cert_der(), now + 60)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("the join token for \"dave\" expired at "),
        "{err}"
    );
    assert!(s.identify(c.cert_der()).is_none());

    let err = s
        .redeem_token(&crate::token::new_secret(), c.cert_der())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("unknown join token"), "{err}");
    let err = s
        .redeem_token("short", c.cert_der())
        .unwrap_err()
        .to_string();
    assert!(err.contains("64 hexadecimal digits"), "{err}");

    // A token for a name that is already trusted is refused at issue.
    s.add(c.cert_der(), "erin", Role::User).unwrap();
    let err = s
        .issue_token(
            "erin",
            Role::User,
            Duration::from_secs(60),
            &server_fp(),
            &[],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("already trusted"), "{err}");

    // Redeeming with an already trusted certificate fails and leaves the token unused.
    let t = s
        .issue_token(
            "frank",
            Role::User,
            Duration::from_secs(60),
            &server_fp(),
            &[],
        )
        .unwrap();
    let err = s
        .redeem_token(&t.secret, c.cert_der())
        .unwrap_err()
        .to_string();
    assert!(err.contains("already trusted as \"erin\""), "{err}");
    let f = client("frank");
    assert_eq!(
        s.redeem_token(&t.secret, f.cert_der()).unwrap().name,
        "frank"
    );
    assert_eq!(s.cancel_tokens("frank").unwrap(), 0);
}

#[test]
fn pki_mode() {
    let (_d, s) = open();
    let ca = CertKey::new_ca("Portcullis test CA").unwrap();
    let now = SystemTime::now();
    let signed = ca
        .sign_client("grace@ops", now - Duration::from_secs(60), now + VALIDITY)
        .unwrap();
    // Same subject, self-signed: a forgery.
    let forged =
        CertKey::self_signed_client("grace@ops", now - Duration::from_secs(60), now + VALIDITY)
            .unwrap();
    assert!(s.identify(signed.cert_der()).is_none(), "no CA yet");

    assert!(
        s.set_ca(signed.cert_pem(), Role::User)
            .unwrap_err()
            .to_string()
            .contains("not a CA certificate")
    );
    s.set_ca(ca.cert_pem(), Role::User).unwrap();
    let id = s.identify(signed.cert_der()).unwrap();
    assert_eq!(
        (id.name.as_str(), id.role, id.source),
        ("grace@ops", Role::User, IdentitySource::Ca)
    );
    assert!(matches!(
        s.authenticate(forged.cert_der()),
        Err(Refusal::Untrusted { .. })
    ));

    // Signed by another CA with the same name.
    let other_ca = CertKey::new_ca("Portcullis test CA").unwrap();
    let other = other_ca
        .sign_client("grace@ops", now - Duration::from_secs(60), now + VALIDITY)
        .unwrap();
    assert!(s.identify(other.cert_der()).is_none());

    // Expired, though signed.
    let expired = ca
        .sign_client(
            "old@ops",
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .unwrap();
    assert_eq!(s.authenticate(expired.cert_der()), Err(Refusal::Expired));

    // A trust store entry wins over the CA's default role.
    s.add(signed.cert_der(), "grace", Role::Admin).unwrap();
    assert_eq!(s.identify(signed.cert_der()).unwrap().role, Role::Admin);
    s.remove("grace").unwrap();
    assert!(matches!(
        s.authenticate(signed.cert_der()),
        Err(Refusal::Revoked { .. })
    ));

    // Revocation without ever adding.
    let signed2 = ca
        .sign_client("heidi@ops", now - Duration::from_secs(60), now + VALIDITY)
        .unwrap();
    assert!(s.identify(signed2.cert_der()).is_some());
    s.revoke(signed2.fingerprint()).unwrap();
    assert!(s.identify(signed2.cert_der()).is_none());

    s.clear_ca();
    let signed3 = ca
        .sign_client("ivan@ops", now - Duration::from_secs(60), now + VALIDITY)
        .unwrap();
    assert!(s.identify(signed3.cert_der()).is_none());
}

#[test]
fn persists_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let a = client("a");
    let b = client("b");
    let secret;
    {
        let s = TrustStore::open(&db).unwrap();
        s.add(a.cert_der(), "a", Role::Operator).unwrap();
        s.add(b.cert_der(), "b", Role::User).unwrap();
        s.remove("b").unwrap();
        let t = s
            .issue_token(
                "c",
                Role::Auditor,
                Duration::from_secs(600),
                &server_fp(),
                &[],
            )
            .unwrap();
        secret = t.secret;
        s.redeem_token(&secret, client("c").cert_der()).unwrap();
    }
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&db).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let s = TrustStore::open(&db).unwrap();
    assert_eq!(s.identify(a.cert_der()).unwrap().role, Role::Operator);
    assert!(matches!(
        s.authenticate(b.cert_der()),
        Err(Refusal::Revoked { .. })
    ));
    let names: Vec<_> = s.list().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["a", "c"]);
    let err = s
        .redeem_token(&secret, client("d").cert_der())
        .unwrap_err()
        .to_string();
    assert!(err.contains("already used"), "{err}");
}

#[test]
fn two_handles_on_one_file_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let s1 = TrustStore::open(&db).unwrap();
    let s2 = TrustStore::open(&db).unwrap();
    let a = client("a");
    s1.add(a.cert_der(), "a", Role::User).unwrap();
    assert!(s2.identify(a.cert_der()).is_none());
    s2.reload().unwrap();
    assert!(s2.identify(a.cert_der()).is_some());
}
