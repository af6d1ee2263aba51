//! The Redis URL forms operators write, and their redaction for display.

use fred::prelude::*;

/// fred's configuration for the URL forms the README documents.
///
/// fred lists extra nodes as `?node=host:port` and names a Sentinel service with
/// `?sentinelServiceName=`; operators write `redis-cluster://h1:p1,h2:p2` and
/// `redis-sentinel://h1:p1,h2:p2/service_name`, so those forms are rewritten into fred's
/// (fred's own forms pass through unchanged). Errors never echo the URL: it may hold a
/// password.
pub fn client_config(url: &str) -> Result<Config, String> {
    check_userinfo(url)?;
    let rewritten = fred_url(url)?;
    Config::from_url(&rewritten).map_err(|e| e.details().to_owned())
}

fn fred_url(url: &str) -> Result<String, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("expected a URL such as redis://host:6379")?;
    let sentinel = match scheme {
        "redis" | "rediss" => return Ok(url.to_owned()),
        "redis-cluster" | "rediss-cluster" => false,
        "redis-sentinel" | "rediss-sentinel" => true,
        other => {
            return Err(format!(
                "unknown scheme {other:?}: expected redis, rediss, redis-cluster, \
                 rediss-cluster, redis-sentinel or rediss-sentinel"
            ))
        }
    };
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, query),
        None => (rest, ""),
    };
    let (userinfo, location) = match rest.rfind('@') {
        Some(at) => rest.split_at(at + 1),
        None => ("", rest),
    };
    let (hosts, path) = location.split_once('/').unwrap_or((location, ""));
    let mut hosts = hosts.split(',').map(str::trim).filter(|h| !h.is_empty());
    let first = hosts.next().ok_or("no host given")?;
    let mut params: Vec<String> = hosts.map(|host| format!("node={host}")).collect();
    let mut database = String::new();
    if sentinel {
        if path.bytes().all(|b| b.is_ascii_digit()) {
            if !path.is_empty() {
                database = format!("/{path}");
            }
        } else {
            params.push(format!("sentinelServiceName={path}"));
        }
    } else if !path.is_empty() {
        return Err("a Cluster URL takes no database: Redis Cluster has database 0 only".into());
    }
    params.extend(
        query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(str::to_owned),
    );
    if sentinel && !params.iter().any(|p| p.starts_with("sentinelServiceName=")) {
        return Err(
            "a Sentinel URL names its service: redis-sentinel://host:port,host:port/service_name"
                .into(),
        );
    }
    let mut out = format!("{scheme}://{userinfo}{first}{database}");
    if !params.is_empty() {
        out.push('?');
        out.push_str(&params.join("&"));
    }
    Ok(out)
}

/// Characters a URL's userinfo cannot hold as they are: `@` ends it, `/` `?` `#` end the
/// authority, `%` starts an escape. Unencoded, they move the host: `redis://:p@ss#w/rd@h`
/// would be a connection to "ss" and a DNS error that names neither the password nor the
/// fix.
const USERINFO_BREAKERS: [char; 4] = ['@', '/', '?', '#'];

/// Refuses a URL whose user or password holds characters that must be percent-encoded.
fn check_userinfo(url: &str) -> Result<(), String> {
    let Some((_, rest)) = url.split_once("://") else {
        return Ok(());
    };
    let Some(at) = rest.rfind('@') else {
        return Ok(());
    };
    let userinfo = &rest[..at];
    let bad_escape = userinfo.match_indices('%').any(|(i, _)| {
        let hex = userinfo.get(i + 1..i + 3).unwrap_or("");
        hex.len() != 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit())
    });
    if userinfo.contains(USERINFO_BREAKERS) || bad_escape {
        return Err(
            "the user or password in the URL holds characters that must be \
             percent-encoded (@ %40, # %23, / %2F, ? %3F, % %25), or give the password \
             unencoded in AIRSTATE_REDIS_PASSWORD instead"
                .into(),
        );
    }
    Ok(())
}

/// `url` with `password` as its userinfo's password, percent-encoded: the password comes
/// from a Secret as it is (AIRSTATE_REDIS_PASSWORD), so no operator has to encode it.
pub fn with_password(url: &str, password: &str) -> Result<String, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("expected a URL such as redis://host:6379")?;
    let encoded = percent_encoding::utf8_percent_encode(password, USERINFO);
    match rest.rfind('@') {
        None => Ok(format!("{scheme}://:{encoded}@{rest}")),
        Some(at) if !rest[..at].contains(':') => Ok(format!(
            "{scheme}://{}:{encoded}@{}",
            &rest[..at],
            &rest[at + 1..]
        )),
        Some(_) => {
            Err("holds a password and so does AIRSTATE_REDIS_PASSWORD: give it in one place".into())
        }
    }
}

/// Everything but RFC 3986's unreserved characters is escaped in a password.
const USERINFO: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub(super) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_url_forms_become_freds() {
        for (given, expected) in [
            ("redis://h:1/2", "redis://h:1/2"),
            ("rediss://u:p@h:1", "rediss://u:p@h:1"),
            (
                "redis-cluster://h1:1,h2:2, h3:3",
                "redis-cluster://h1:1?node=h2:2&node=h3:3",
            ),
            (
                "rediss-cluster://:pw@h1:1,h2:2",
                "rediss-cluster://:pw@h1:1?node=h2:2",
            ),
            (
                "redis-cluster://h1:1?node=h2:2",
                "redis-cluster://h1:1?node=h2:2",
            ),
            (
                "redis-sentinel://u:p@s1:26379,s2:26379/mymaster",
                "redis-sentinel://u:p@s1:26379?node=s2:26379&sentinelServiceName=mymaster",
            ),
            (
                "redis-sentinel://s1:26379/3?sentinelServiceName=m",
                "redis-sentinel://s1:26379/3?sentinelServiceName=m",
            ),
        ] {
            assert_eq!(fred_url(given).unwrap(), expected, "{given}");
            client_config(given).unwrap_or_else(|e| panic!("{given}: {e}"));
        }
        let cluster = client_config("redis-cluster://h1:1,h2:2").unwrap();
        assert!(cluster.server.is_clustered());
        let sentinel = client_config("redis-sentinel://s1:1,s2:2/svc").unwrap();
        assert!(sentinel.server.is_sentinel());
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_secrets() {
        for bad in [
            "http://h:1",
            "redis-cluster://h:1/0",
            "redis-sentinel://s1:1,s2:2",
            "redis-cluster://",
            "nonsense",
        ] {
            let message = client_config(bad).unwrap_err();
            assert!(!message.is_empty(), "{bad}");
        }
        let message = client_config("redis-sentinel://user:hunter2@s1:1").unwrap_err();
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn unencoded_password_characters_are_refused_and_encoded_ones_pass() {
        for bad in [
            "redis://:p@ss#w/rd@redis:6379",
            "redis://:p@ss@redis:6379",
            "rediss://:a/b@redis:6379",
            "redis://:a?b@redis:6379",
            "redis-cluster://:p#w@h1:1,h2:2",
            "redis-sentinel://:p@w@s1:1,s2:2/m",
            "redis://:100%@redis:6379",
        ] {
            let message = client_config(bad).unwrap_err();
            assert!(message.contains("percent-encoded"), "{bad}: {message}");
            assert!(
                message.contains("AIRSTATE_REDIS_PASSWORD"),
                "{bad}: {message}"
            );
        }
        let encoded = with_password("redis://redis:6379", "p@ss#w/rd").unwrap();
        assert_eq!(encoded, "redis://:p%40ss%23w%2Frd@redis:6379");
        let config = client_config(&encoded).unwrap();
        assert_eq!(config.password.as_deref(), Some("p@ss#w/rd"));
        assert_eq!(&*config.server.hosts()[0].host, "redis");
        let user = with_password("rediss-cluster://app@h1:1,h2:2", "a b:%c").unwrap();
        let config = client_config(&user).unwrap();
        assert_eq!(config.username.as_deref(), Some("app"));
        assert_eq!(config.password.as_deref(), Some("a b:%c"));
        assert!(with_password("redis://:pw@h:1", "other").is_err());
    }

    #[test]
    fn url_credentials_are_redacted() {
        assert_eq!(
            redact_url("redis://user:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    }
}
