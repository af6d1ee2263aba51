//! Verification keys: one HMAC secret, or public keys looked up by `kid`.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde_json::{Map, Value};

use super::{AuthError, AuthSettings};

/// A configuration problem with the keys, naming the variable at fault.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct KeyError {
    pub variable: String,
    pub message: String,
}

impl KeyError {
    pub fn new(variable: &str, message: impl Into<String>) -> Self {
        Self {
            variable: variable.to_owned(),
            message: message.into(),
        }
    }
}

const JWKS_VAR: &str = "AIRFLOW__API_AUTH__TRUSTED_JWKS_URL";
const PRIVATE_KEY_VAR: &str = "AIRFLOW__API_AUTH__JWT_PRIVATE_KEY_PATH";
const SECRET_VAR: &str = "AIRFLOW__API_AUTH__JWT_SECRET";
const ALGORITHM_VAR: &str = "AIRFLOW__API_AUTH__JWT_ALGORITHM";

type KidMap = HashMap<String, (DecodingKey, Algorithm)>;

/// At most one JWKS re-read per this long is caused by tokens with an unknown `kid`, so
/// made-up kids cannot turn into a flood of fetches.
const UNKNOWN_KID_REFRESH_GAP: Duration = Duration::from_secs(5);
/// How long a request with an unknown `kid` waits for that re-read.
const UNKNOWN_KID_WAIT: Duration = Duration::from_secs(3);

/// Lets a token signed with a key Airflow just added be accepted at once: an unknown
/// `kid` wakes the refresh task early, and requests carrying it wait for the result.
#[derive(Default)]
pub(super) struct EarlyRefresh {
    wake: Notify,
    /// Bumped after every refresh attempt, successful or not.
    attempts: watch::Sender<u64>,
    /// When an early refresh was last asked for, and the attempt count then.
    asked: Mutex<Option<(Instant, u64)>>,
}

impl EarlyRefresh {
    /// Asks for a refresh (unless one was asked for within the gap and has finished) and
    /// waits for it; true when one finished in time, so the keys are worth a second look.
    async fn refresh_for_unknown_kid(&self) -> bool {
        let mut attempts = self.attempts.subscribe();
        let now_at = *attempts.borrow_and_update();
        let wait = {
            let mut asked = self.asked.lock().unwrap();
            match *asked {
                // Asked recently: wait only if that refresh is still running.
                Some((at, before)) if at.elapsed() < UNKNOWN_KID_REFRESH_GAP => before == now_at,
                _ => {
                    *asked = Some((Instant::now(), now_at));
                    self.wake.notify_one();
                    true
                }
            }
        };
        wait && tokio::time::timeout(UNKNOWN_KID_WAIT, attempts.changed())
            .await
            .is_ok_and(|changed| changed.is_ok())
    }
}

pub(super) enum KeyRing {
    Secret {
        key: DecodingKey,
        algorithm: Algorithm,
    },
    /// Public keys by `kid`; a token without a `kid` is refused, as in Airflow.
    ByKid {
        keys: Arc<RwLock<KidMap>>,
        /// Where to re-read a JWKS from; `None` for a private key's single public key.
        jwks_source: Option<String>,
        configured: Option<Algorithm>,
        description: String,
        early: Arc<EarlyRefresh>,
        /// Bumped whenever a re-read drops a `kid`: tokens verified before then under
        /// that key must be verified again.
        removals: Arc<AtomicU64>,
    },
}

/// The signing half, when the gateway holds it: key, algorithm and `kid`.
pub(super) type SigningKey = (EncodingKey, Algorithm, String);

impl KeyRing {
    pub(super) fn load(settings: &AuthSettings) -> Result<(Self, Option<SigningKey>), KeyError> {
        if let Some(source) = &settings.jwks_source {
            let keys = fetch_jwks(source, settings.algorithm, settings.jwks_timeout)?;
            let description = format!("JWKS from {source} ({} keys)", keys.len());
            return Ok((
                KeyRing::ByKid {
                    keys: Arc::new(RwLock::new(keys)),
                    jwks_source: Some(source.clone()),
                    configured: settings.algorithm,
                    description,
                    early: Arc::default(),
                    removals: Arc::default(),
                },
                None,
            ));
        }
        if let Some(path) = &settings.private_key_path {
            return load_private_key(path, settings);
        }
        if let Some(secret) = &settings.secret {
            let algorithm = settings.algorithm.unwrap_or(Algorithm::HS512);
            if !matches!(
                algorithm,
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
            ) {
                return Err(KeyError::new(
                    ALGORITHM_VAR,
                    format!("{algorithm:?} needs a public key; a JWT secret signs HS256/HS384/HS512 only"),
                ));
            }
            let kid = settings
                .kid
                .clone()
                .unwrap_or_else(|| "airstate".to_owned());
            return Ok((
                KeyRing::Secret {
                    key: DecodingKey::from_secret(secret.as_bytes()),
                    algorithm,
                },
                Some((EncodingKey::from_secret(secret.as_bytes()), algorithm, kid)),
            ));
        }
        Err(KeyError::new(
            SECRET_VAR,
            format!("no JWT key configured: set {SECRET_VAR}, {JWKS_VAR} or {PRIVATE_KEY_VAR}"),
        ))
    }

    pub(super) fn describe(&self) -> String {
        match self {
            KeyRing::Secret { algorithm, .. } => format!("shared secret ({algorithm:?})"),
            KeyRing::ByKid { description, .. } => description.clone(),
        }
    }

    pub(super) fn decode(
        &self,
        token: &str,
        validation: &Validation,
    ) -> Result<Map<String, Value>, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
        // No extension is understood, so any `crit` header is refused (RFC 7515 §4.1.11),
        // as PyJWT refuses it for Airflow.
        if header.crit.is_some() {
            return Err(AuthError::Invalid);
        }
        let decode = |key: &DecodingKey, algorithm: Algorithm| {
            if header.alg != algorithm {
                return Err(AuthError::Invalid);
            }
            let mut validation = validation.clone();
            validation.algorithms = vec![algorithm];
            jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation)
                .map(|data| data.claims)
                .map_err(|error| {
                    tracing::debug!(%error, "token rejected");
                    AuthError::Invalid
                })
        };
        match self {
            KeyRing::Secret { key, algorithm } => decode(key, *algorithm),
            KeyRing::ByKid { keys, .. } => {
                let kid = header.kid.as_deref().ok_or(AuthError::Invalid)?;
                let keys = keys.read().unwrap();
                let (key, algorithm) = keys.get(kid).ok_or(AuthError::UnknownKid)?;
                decode(key, *algorithm)
            }
        }
    }

    /// Changes when trusted keys are withdrawn; a remembered verification from before a
    /// change no longer counts.
    pub(super) fn removals(&self) -> u64 {
        match self {
            KeyRing::ByKid { removals, .. } => removals.load(Ordering::Acquire),
            KeyRing::Secret { .. } => 0,
        }
    }

    /// After a token named a `kid` we do not know: re-reads the JWKS now (within limits)
    /// and says whether the token is worth decoding again.
    pub(super) async fn refresh_for_unknown_kid(&self) -> bool {
        match self {
            KeyRing::ByKid {
                jwks_source: Some(_),
                early,
                ..
            } => early.refresh_for_unknown_kid().await,
            _ => false,
        }
    }

    pub(super) fn spawn_refresh(&self, every: Duration, timeout: Duration) {
        let KeyRing::ByKid {
            keys,
            jwks_source: Some(source),
            configured,
            early,
            removals,
            ..
        } = self
        else {
            return;
        };
        let (keys, source, configured, early, removals) = (
            keys.clone(),
            source.clone(),
            *configured,
            early.clone(),
            removals.clone(),
        );
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = early.wake.notified() => {
                        tracing::info!("a token names an unknown kid: re-reading the JWKS now");
                    }
                }
                let source_for_fetch = source.clone();
                let fetched = tokio::task::spawn_blocking(move || {
                    fetch_jwks(&source_for_fetch, configured, timeout)
                })
                .await;
                match fetched {
                    Ok(Ok(fresh)) => {
                        let mut trusted = keys.write().unwrap();
                        let withdrawn = trusted.keys().any(|kid| !fresh.contains_key(kid));
                        *trusted = fresh;
                        if withdrawn {
                            tracing::info!(
                                "a key left the JWKS: its tokens are refused from now on"
                            );
                            removals.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                    // Keep serving with the keys we have: a JWKS outage must not lock out
                    // every worker.
                    Ok(Err(error)) => tracing::warn!(%error, "JWKS refresh failed"),
                    Err(error) => tracing::warn!(%error, "JWKS refresh task failed"),
                }
                early.attempts.send_modify(|count| *count += 1);
            }
        });
    }
}

fn fetch_jwks(
    source: &str,
    configured: Option<Algorithm>,
    timeout: Duration,
) -> Result<KidMap, KeyError> {
    let text = if source.starts_with("http://") || source.starts_with("https://") {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .build()
            .into();
        agent
            .get(source)
            .call()
            .map_err(|e| KeyError::new(JWKS_VAR, format!("cannot fetch {source}: {e}")))?
            .body_mut()
            .read_to_string()
            .map_err(|e| KeyError::new(JWKS_VAR, format!("cannot read {source}: {e}")))?
    } else {
        let path = source.strip_prefix("file://").unwrap_or(source);
        std::fs::read_to_string(path)
            .map_err(|e| KeyError::new(JWKS_VAR, format!("cannot read {path}: {e}")))?
    };
    let set: JwkSet = serde_json::from_str(&text)
        .map_err(|e| KeyError::new(JWKS_VAR, format!("not a JWKS document: {e}")))?;
    let mut keys = KidMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        // Symmetric keys in a JWKS would let anyone holding the JWKS sign tokens.
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
            continue;
        }
        let Some(algorithm) = configured.or_else(|| algorithm_of(jwk)) else {
            tracing::warn!(kid, "skipping a JWK whose algorithm cannot be determined");
            continue;
        };
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| KeyError::new(JWKS_VAR, format!("unusable key {kid}: {e}")))?;
        keys.insert(kid, (key, algorithm));
    }
    if keys.is_empty() {
        return Err(KeyError::new(
            JWKS_VAR,
            "the JWKS holds no usable public key with a kid",
        ));
    }
    Ok(keys)
}

fn algorithm_of(jwk: &Jwk) -> Option<Algorithm> {
    if let Some(declared) = &jwk.common.key_algorithm {
        return Algorithm::from_str(&declared.to_string()).ok();
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Some(Algorithm::ES256),
            EllipticCurve::P384 => Some(Algorithm::ES384),
            _ => None,
        },
        AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
        _ => None,
    }
}

/// Airflow's private-key mode: its public key is trusted under the configured `kid`, or
/// the key's RFC 7638 thumbprint.
fn load_private_key(
    path: &std::path::Path,
    settings: &AuthSettings,
) -> Result<(KeyRing, Option<SigningKey>), KeyError> {
    let pem = std::fs::read(path).map_err(|e| {
        KeyError::new(
            PRIVATE_KEY_VAR,
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let (encoding, guessed) = if let Ok(key) = EncodingKey::from_rsa_pem(&pem) {
        (key, Algorithm::RS256)
    } else if let Ok(key) = EncodingKey::from_ed_pem(&pem) {
        (key, Algorithm::EdDSA)
    } else if let Ok(key) = EncodingKey::from_ec_pem(&pem) {
        (key, Algorithm::ES256)
    } else {
        return Err(KeyError::new(
            PRIVATE_KEY_VAR,
            "not an RSA, Ed25519 or EC private key in PEM form",
        ));
    };
    let algorithm = settings.algorithm.unwrap_or(guessed);
    let public = Jwk::from_encoding_key(&encoding, algorithm).map_err(|e| {
        KeyError::new(
            PRIVATE_KEY_VAR,
            format!("cannot derive the public key: {e}"),
        )
    })?;
    let decoding = DecodingKey::from_jwk(&public)
        .map_err(|e| KeyError::new(PRIVATE_KEY_VAR, format!("cannot use the public key: {e}")))?;
    let kid = match &settings.kid {
        Some(kid) => kid.clone(),
        None => public.thumbprint(ThumbprintHash::SHA256).map_err(|e| {
            KeyError::new(
                PRIVATE_KEY_VAR,
                format!("cannot compute the key thumbprint: {e}"),
            )
        })?,
    };
    let description = format!("private key {} ({algorithm:?}, kid {kid})", path.display());
    let keys = HashMap::from([(kid.clone(), (decoding, algorithm))]);
    Ok((
        KeyRing::ByKid {
            keys: Arc::new(RwLock::new(keys)),
            jwks_source: None,
            configured: Some(algorithm),
            description,
            early: Arc::default(),
            removals: Arc::default(),
        },
        Some((encoding, algorithm, kid)),
    ))
}
