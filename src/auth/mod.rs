//! Airflow's execution JWTs, validated locally on every request.
//!
//! The keys are chosen as Airflow chooses them: a trusted JWKS (file or URL, refreshed in
//! the background) wins over a private key, which wins over a shared secret. Each mode
//! pins its algorithms, so `alg: none` and HMAC-signed-with-a-public-key tokens never
//! validate. When the gateway holds the signing key it can also hand out refreshed
//! tokens, as Airflow's API server does.

mod keys;

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, Validation};
use serde_json::{Map, Value};
use uuid::Uuid;

pub use keys::KeyError;
use keys::KeyRing;

/// The all-zero subject Airflow's in-process API (triggerer, `dags test`) uses.
pub const WATCHER_SUBJECT: Uuid = Uuid::nil();

/// What a token may be used for. Only `execution` tokens reach the state routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenScope {
    Execution,
    Workload,
}

impl TokenScope {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenScope::Execution => "execution",
            TokenScope::Workload => "workload",
        }
    }
}

/// A validated token.
#[derive(Debug, Clone)]
pub struct Claims {
    pub subject: Uuid,
    pub scope: TokenScope,
    pub issued_at: i64,
    pub expires_at: i64,
    /// Every claim, kept for identity-from-claims and for minting a refreshed token.
    pub all: Map<String, Value>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("Missing auth token")]
    Missing,
    #[error("Invalid auth token")]
    Invalid,
    /// The token validated but a claim has a value Airflow's claim model refuses; Airflow
    /// reports the model's message after the prefix.
    #[error("Invalid auth token: {0}")]
    InvalidClaim(String),
    /// Signed under a `kid` no trusted key has, even after re-reading the JWKS; worded as
    /// `Invalid` for the client, counted apart in metrics.
    #[error("Invalid auth token")]
    UnknownKid,
}

/// Settings read from Airflow's `[api_auth]` / `[execution_api]` options.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub secret: Option<String>,
    pub jwks_source: Option<String>,
    pub private_key_path: Option<std::path::PathBuf>,
    pub algorithm: Option<Algorithm>,
    pub kid: Option<String>,
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    pub leeway: Duration,
    /// Lifetime of a refreshed token (`[execution_api] jwt_expiration_time`).
    pub refreshed_lifetime: Duration,
    pub jwks_refresh: Duration,
    /// Whole JWKS fetch, connect to last body byte: ureq has no timeout of its own, and an
    /// endpoint that never answers would hang start-up and every later refresh.
    pub jwks_timeout: Duration,
    /// The most memory verified tokens may take (`AIRSTATE_TOKEN_CACHE_MAX_BYTES`).
    pub token_cache_bytes: u64,
}

/// Signs refreshed tokens; present only when the gateway holds Airflow's signing key.
struct Signer {
    key: EncodingKey,
    header: Header,
}

/// How long a verified token is remembered. Its own `exp`/`nbf` are still checked on
/// every use, and a key leaving the JWKS voids what it vouched for at that re-read.
const VERIFIED_TTL: Duration = Duration::from_secs(30);

/// What one remembered token is counted as: its text, kept as the key, and its decoded
/// claims (a JSON map, several times the size of the claims' text), estimated from the
/// token's length so that weighing costs nothing.
pub fn verified_weight(token: &str) -> u32 {
    let estimate = 4 * token.len() + 512;
    u32::try_from(estimate).unwrap_or(u32::MAX)
}

pub struct Authenticator {
    keys: KeyRing,
    /// Tokens whose signature and claims already checked out: a worker sends the same
    /// token for minutes, so the signature and JSON work is done once, not per request.
    /// Each entry remembers the key ring's removal count when it was verified.
    verified: moka::sync::Cache<Box<str>, (Arc<Claims>, u64), foldhash::fast::RandomState>,
    leeway: i64,
    validation: Validation,
    signer: Option<Signer>,
    issuer: Option<String>,
    audience: String,
    refreshed_lifetime: i64,
}

impl Authenticator {
    /// Loads the keys (fetching a JWKS once, so a bad URL fails at start-up).
    pub fn new(settings: &AuthSettings) -> Result<Arc<Self>, KeyError> {
        let (keys, signer) = KeyRing::load(settings)?;
        // The algorithm is pinned per key by the key ring; this carries the claim rules.
        let mut validation = Validation::new(Algorithm::HS512);
        let mut required = vec!["aud", "exp"];
        if let Some(issuer) = &settings.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        validation.set_audience(&settings.audiences);
        validation.leeway = settings.leeway.as_secs();
        validation.validate_nbf = true;
        Ok(Arc::new(Self {
            keys,
            verified: moka::sync::Cache::<Box<str>, (Arc<Claims>, u64)>::builder()
                .max_capacity(settings.token_cache_bytes)
                .weigher(|token, _| verified_weight(token))
                .time_to_live(VERIFIED_TTL)
                // SipHash of a ~600-byte token was half of the lookup's cost per request.
                // A faster hash is safe here: only tokens whose signature verified are
                // inserted, so nobody can choose keys to collide; foldhash is seeded per
                // process all the same.
                .build_with_hasher(foldhash::fast::RandomState::default()),
            leeway: settings.leeway.as_secs() as i64,
            validation,
            signer: signer.map(|(key, algorithm, kid)| {
                let mut header = Header::new(algorithm);
                header.kid = Some(kid);
                Signer { key, header }
            }),
            issuer: settings.issuer.clone(),
            audience: settings.audiences.first().cloned().unwrap_or_default(),
            refreshed_lifetime: settings.refreshed_lifetime.as_secs() as i64,
        }))
    }

    /// The memory the verified-token cache is counted at now, and its entries.
    pub fn token_cache_usage(&self) -> (u64, u64) {
        self.verified.run_pending_tasks();
        (self.verified.weighted_size(), self.verified.entry_count())
    }

    /// Starts background refresh of a JWKS; a no-op in other key modes.
    pub fn spawn_refresh(self: &Arc<Self>, every: Duration, timeout: Duration) {
        self.keys.spawn_refresh(every, timeout);
    }

    pub fn describe(&self) -> String {
        self.keys.describe()
    }

    /// Validates an `Authorization` header value. A token naming a `kid` we do not know
    /// waits (briefly) for a JWKS re-read, so a key Airflow just added works at once.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
    ) -> Result<Arc<Claims>, AuthError> {
        let token = authorization
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::Missing)?;
        let removals = self.keys.removals();
        if let Some((claims, _)) = self
            .verified
            .get(token)
            .filter(|(_, verified_at)| *verified_at == removals)
        {
            let now = chrono::Utc::now().timestamp();
            let not_before = claims.all.get("nbf").and_then(seconds);
            if claims.expires_at.saturating_add(self.leeway) >= now
                && not_before.is_none_or(|nbf| nbf.saturating_sub(self.leeway) <= now)
            {
                return Ok(claims);
            }
            return Err(AuthError::Invalid);
        }
        let claims = match self.verify(token) {
            Err(AuthError::UnknownKid) if self.keys.refresh_for_unknown_kid().await => {
                self.verify(token)?
            }
            outcome => outcome?,
        };
        let claims = Arc::new(claims);
        self.verified
            .insert(token.into(), (claims.clone(), removals));
        Ok(claims)
    }

    /// The full check: signature, registered claims, then Airflow's own claim rules.
    fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let all = self.keys.decode(token, &self.validation)?;
        let number = |name: &str| {
            all.get(name)
                .map(|value| seconds(value).ok_or(AuthError::Invalid))
        };
        let (Some(issued_at), Some(expires_at)) = (number("iat"), number("exp")) else {
            return Err(AuthError::Invalid);
        };
        let (issued_at, expires_at) = (issued_at?, expires_at?);
        if let Some(not_before) = number("nbf") {
            not_before?;
        }
        // PyJWT refuses a token issued in the future (beyond the leeway).
        if issued_at > chrono::Utc::now().timestamp().saturating_add(self.leeway) {
            return Err(AuthError::Invalid);
        }
        // Airflow answers 500 for a missing or non-UUID subject; a client error is right.
        let subject = all
            .get("sub")
            .and_then(Value::as_str)
            .and_then(|sub| Uuid::parse_str(sub).ok())
            .ok_or(AuthError::Invalid)?;
        let scope = match all.get("scope") {
            None => TokenScope::Execution,
            Some(Value::String(s)) if s == "execution" => TokenScope::Execution,
            Some(Value::String(s)) if s == "workload" => TokenScope::Workload,
            Some(other) => {
                return Err(AuthError::InvalidClaim(format!(
                    "1 validation error for TIClaims\nscope\n  Input should be 'execution' or 'workload' [type=literal_error, input_value={other}]"
                )))
            }
        };
        Ok(Claims {
            subject,
            scope,
            issued_at,
            expires_at,
            all,
        })
    }
}

/// A time claim in seconds. Airflow (PyJWT) takes any Python int; one that does not fit
/// 64 bits is refused here, so that the same token is not accepted once and then refused
/// once its remembered expiry overflows (a deliberate difference, see the README).
fn seconds(value: &Value) -> Option<i64> {
    value.as_i64().or_else(|| {
        let n = value.as_f64()?;
        (n.is_finite() && n.abs() < 9.0e18).then_some(n as i64)
    })
}

impl Authenticator {
    /// A replacement token when this one is close to expiry, on Airflow's rule: not for
    /// `workload` tokens, and only once at most max(20 % of the lifetime, 30 s) remains.
    pub fn refreshed_token(&self, claims: &Claims, now: i64) -> Option<String> {
        let signer = self.signer.as_ref()?;
        if claims.scope == TokenScope::Workload {
            return None;
        }
        let lifetime = (claims.expires_at - claims.issued_at).max(0);
        let threshold = (lifetime / 5).max(30);
        if claims.expires_at - now > threshold {
            return None;
        }
        let mut fresh = claims.all.clone();
        fresh.insert("jti".into(), Uuid::new_v4().simple().to_string().into());
        fresh.insert("iat".into(), now.into());
        fresh.insert("nbf".into(), now.into());
        fresh.insert("exp".into(), (now + self.refreshed_lifetime).into());
        jsonwebtoken::encode(&signer.header, &fresh, &signer.key)
            .map_err(|error| tracing::warn!(%error, "could not sign a refreshed token"))
            .ok()
    }

    /// Mints an execution token the way Airflow does; for `airstate token` and tests.
    pub fn mint(&self, extra: Map<String, Value>, lifetime: Duration) -> Result<String, KeyError> {
        let signer = self.signer.as_ref().ok_or_else(|| {
            KeyError::new(
                "AIRFLOW__API_AUTH__JWT_SECRET",
                "minting needs the signing key: a JWT secret or a private key, not a JWKS",
            )
        })?;
        let now = chrono::Utc::now().timestamp();
        let mut claims = Map::new();
        claims.insert("jti".into(), Uuid::new_v4().simple().to_string().into());
        claims.insert("aud".into(), self.audience.clone().into());
        if let Some(issuer) = &self.issuer {
            claims.insert("iss".into(), issuer.clone().into());
        }
        claims.insert("scope".into(), "execution".into());
        claims.insert("iat".into(), now.into());
        claims.insert("nbf".into(), now.into());
        claims.insert("exp".into(), (now + lifetime.as_secs() as i64).into());
        claims.extend(extra);
        jsonwebtoken::encode(&signer.header, &claims, &signer.key)
            .map_err(|e| KeyError::new("token", e.to_string()))
    }
}
