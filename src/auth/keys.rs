//! Private keys for SMART Backend Services: PEM (PKCS#8, PKCS#1, SEC1) or JWK; RSA signs RS384,
//! P-384 EC signs ES384 (the two algorithms the SMART spec requires clients to support).

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use p384::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rsa::pkcs1::DecodeRsaPrivateKey;

/// A key ready to sign client assertions.
#[derive(Clone)]
pub struct SigningKey {
    pub key: EncodingKey,
    pub alg: Algorithm,
    /// The public half as a JWK (no `kid`): what the server must have registered.
    pub public_jwk: serde_json::Value,
}

fn b64u(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

impl SigningKey {
    /// A JWK Set with the public key, for registering the client with a server.
    pub fn jwks(&self, kid: &str) -> serde_json::Value {
        let mut k = self.public_jwk.clone();
        k["kid"] = serde_json::json!(kid);
        k["use"] = serde_json::json!("sig");
        k["key_ops"] = serde_json::json!(["verify"]);
        serde_json::json!({"keys": [k]})
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({:?}, ***)", self.alg)
    }
}

fn rsa_key(k: rsa::RsaPrivateKey) -> Result<SigningKey, String> {
    use rsa::traits::PublicKeyParts;
    if k.size() < 256 {
        return Err("RSA keys must have at least 2048 bits".into());
    }
    let pem = k.to_pkcs8_pem(LineEnding::LF).map_err(|e| format!("cannot encode the RSA key: {e}"))?;
    let key = EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| format!("unusable RSA key: {e}"))?;
    let public_jwk = serde_json::json!({"kty": "RSA", "alg": "RS384", "n": b64u(&k.n().to_bytes_be()), "e": b64u(&k.e().to_bytes_be())});
    Ok(SigningKey { key, alg: Algorithm::RS384, public_jwk })
}

fn ec_key(k: p384::SecretKey) -> Result<SigningKey, String> {
    use p384::elliptic_curve::sec1::ToEncodedPoint;
    let pem = k.to_pkcs8_pem(LineEnding::LF).map_err(|e| format!("cannot encode the EC key: {e}"))?;
    let key = EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| format!("unusable EC key: {e}"))?;
    let point = k.public_key().to_encoded_point(false);
    let (x, y) = (point.x().map(|x| b64u(x)).unwrap_or_default(), point.y().map(|y| b64u(y)).unwrap_or_default());
    let public_jwk = serde_json::json!({"kty": "EC", "crv": "P-384", "alg": "ES384", "x": x, "y": y});
    Ok(SigningKey { key, alg: Algorithm::ES384, public_jwk })
}

fn b64(field: &str, v: &serde_json::Value) -> Result<Vec<u8>, String> {
    let s = v.get(field).and_then(|x| x.as_str()).ok_or_else(|| format!("the JWK has no \"{field}\""))?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| format!("the JWK's \"{field}\" is not base64url"))
}

fn from_jwk(text: &str) -> Result<SigningKey, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not a JSON Web Key: {e}"))?;
    // a JWK Set with one private key is accepted too
    let v = match v.get("keys").and_then(|k| k.as_array()) {
        Some(keys) => keys.iter().find(|k| k.get("d").is_some()).cloned().ok_or("the JWK Set holds no private key")?,
        None => v,
    };
    match v.get("kty").and_then(|k| k.as_str()) {
        Some("RSA") => {
            let n = rsa::BigUint::from_bytes_be(&b64("n", &v)?);
            let e = rsa::BigUint::from_bytes_be(&b64("e", &v)?);
            let d = rsa::BigUint::from_bytes_be(&b64("d", &v)?);
            let primes = match (b64("p", &v), b64("q", &v)) {
                (Ok(p), Ok(q)) => vec![rsa::BigUint::from_bytes_be(&p), rsa::BigUint::from_bytes_be(&q)],
                _ => vec![],
            };
            let k =
                rsa::RsaPrivateKey::from_components(n, e, d, primes).map_err(|e| format!("invalid RSA JWK: {e}"))?;
            rsa_key(k)
        }
        Some("EC") => {
            match v.get("crv").and_then(|c| c.as_str()) {
                Some("P-384") => {}
                other => return Err(format!("EC keys must use curve P-384 for ES384 (the JWK says {other:?})")),
            }
            let d = b64("d", &v)?;
            let k = p384::SecretKey::from_slice(&d).map_err(|_| "invalid P-384 private key in the JWK".to_string())?;
            ec_key(k)
        }
        other => Err(format!("unsupported JWK kty {other:?} (use RSA or EC P-384)")),
    }
}

/// Parses a private key from PEM or JWK text. Errors never contain key material.
pub fn parse_private_key(bytes: &[u8]) -> Result<SigningKey, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the key is not text (expected PEM or JWK)".to_string())?.trim();
    if text.starts_with('{') {
        return from_jwk(text);
    }
    if text.contains("BEGIN RSA PRIVATE KEY") {
        let k = rsa::RsaPrivateKey::from_pkcs1_pem(text).map_err(|e| format!("invalid PKCS#1 RSA key: {e}"))?;
        return rsa_key(k);
    }
    if text.contains("BEGIN EC PRIVATE KEY") {
        let k = p384::SecretKey::from_sec1_pem(text)
            .map_err(|_| "invalid SEC1 EC key (only curve P-384 is supported, for ES384)".to_string())?;
        return ec_key(k);
    }
    if text.contains("BEGIN PRIVATE KEY") {
        if let Ok(k) = rsa::RsaPrivateKey::from_pkcs8_pem(text) {
            return rsa_key(k);
        }
        if let Ok(k) = p384::SecretKey::from_pkcs8_pem(text) {
            return ec_key(k);
        }
        return Err("the PKCS#8 key is neither RSA nor EC P-384 (SMART requires RS384 or ES384)".into());
    }
    if text.contains("ENCRYPTED PRIVATE KEY") {
        return Err("encrypted private keys are not supported: store the key unencrypted in the Secret".into());
    }
    Err("not a private key: expected PEM (PKCS#8, PKCS#1 or SEC1) or a JWK".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwk_and_pem_give_the_same_public_key() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
        let read = |f: &str| std::fs::read(format!("{dir}{f}")).unwrap();
        let a = parse_private_key(&read("rsa-pkcs8.pem")).unwrap();
        let b = parse_private_key(&read("rsa.jwk.json")).unwrap();
        let c = parse_private_key(&read("rsa-pkcs1.pem")).unwrap();
        assert_eq!(a.public_jwk, b.public_jwk);
        assert_eq!(a.public_jwk, c.public_jwk);
        assert_eq!(a.alg, Algorithm::RS384);
        let e = parse_private_key(&read("ec-sec1.pem")).unwrap();
        assert_eq!(e.alg, Algorithm::ES384);
        assert_eq!(e.public_jwk, parse_private_key(&read("ec.jwk.json")).unwrap().public_jwk);
        assert_eq!(e.public_jwk, parse_private_key(&read("ec-pkcs8.pem")).unwrap().public_jwk);
        // matches the JWKS a server would have registered
        let jwks: serde_json::Value = serde_json::from_slice(&read("jwks.json")).unwrap();
        assert_eq!(a.jwks("rsa-1")["keys"][0]["n"], jwks["keys"][0]["n"]);
        assert_eq!(e.jwks("ec-1")["keys"][0]["x"], jwks["keys"][1]["x"]);
    }
}
