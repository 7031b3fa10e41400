//! Access to the guarded routes (everything but `/health`, `/ready` and `/metrics`): who may call
//! them — nobody checked, HTTP basic, or a bearer token — and how often each client may, as a
//! GCRA rate limit (`governor`) keyed by the client's address. Behind a reverse proxy every
//! request comes from the proxy, so for a peer in `server.trusted_proxies` the client is the
//! rightmost `X-Forwarded-For` address that is not itself a trusted proxy (a client can put any
//! address it likes to the left of the ones the proxies append, so those are never believed).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;

use super::problem::ApiError;

/// Who may call the prediction, account, alert and documentation routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    Basic { username: String, password: String },
    Bearer { token: String },
}

/// Requests per second per client, with bursts of up to `burst`; `per_second == 0`: no limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

impl RateLimit {
    pub const NONE: Self = Self {
        per_second: 0.0,
        burst: 1,
    };

    fn quota(self) -> Option<Quota> {
        if self.per_second <= 0.0 || !self.per_second.is_finite() {
            return None;
        }
        let period = Duration::from_secs_f64(1.0 / self.per_second).max(Duration::from_nanos(1));
        Some(Quota::with_period(period)?.allow_burst(NonZeroU32::new(self.burst.max(1))?))
    }
}

/// The server's access settings (`server.auth`, `server.rate_limit`, `server.trusted_proxies`).
#[derive(Debug, Clone, PartialEq)]
pub struct AccessSettings {
    pub auth: Auth,
    pub rate_limit: RateLimit,
    pub trusted_proxies: Vec<IpNet>,
}

impl Default for AccessSettings {
    fn default() -> Self {
        Self {
            auth: Auth::None,
            rate_limit: RateLimit::NONE,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Clients tracked before idle ones are forgotten at once rather than at the next sweep: a
/// scan from many addresses cannot grow the limiter's map without bound.
const MAX_TRACKED_CLIENTS: usize = 100_000;

/// Authentication and per-client rate limits of the guarded routes.
pub struct Access {
    /// The exact `Authorization` header value that is accepted, if any is required.
    expected: Option<String>,
    scheme: &'static str,
    limit: RateLimit,
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    trusted_proxies: Vec<IpNet>,
}

impl Access {
    /// No authentication, no limit.
    pub fn open() -> Arc<Self> {
        Self::new(AccessSettings::default())
    }

    pub fn new(settings: AccessSettings) -> Arc<Self> {
        use base64::Engine as _;
        let (expected, scheme) = match settings.auth {
            Auth::None => (None, ""),
            Auth::Basic { username, password } => (
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD
                        .encode(format!("{username}:{password}"))
                )),
                "Basic realm=\"vigil\"",
            ),
            Auth::Bearer { token } => (Some(format!("Bearer {token}")), "Bearer"),
        };
        Arc::new(Self {
            expected,
            scheme,
            limit: settings.rate_limit,
            limiter: settings.rate_limit.quota().map(RateLimiter::keyed),
            trusted_proxies: settings.trusted_proxies,
        })
    }

    fn authorized(&self, header: Option<&[u8]>) -> bool {
        let Some(expected) = &self.expected else {
            return true;
        };
        let Some(given) = header else { return false };
        // Compares every byte whatever the first difference, so timing says nothing.
        given.len() == expected.len()
            && given
                .iter()
                .zip(expected.as_bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// The client a request is from: the peer, or behind trusted proxies the address the
    /// nearest of them was asked by. Without a peer (a router driven in-process) the loopback.
    pub fn client(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        if !self.trusted(client) {
            return client;
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect::<Vec<_>>();
        for hop in forwarded.iter().rev() {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = ip;
                    if !self.trusted(ip) {
                        break;
                    }
                }
                // A hop that is not an address ends what can be believed.
                Err(_) => break,
            }
        }
        client
    }

    /// Takes one request from `client`'s allowance; `Err(wait)` until the next one is due.
    fn take(&self, client: IpAddr) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if limiter.len() > MAX_TRACKED_CLIENTS {
            self.forget_idle_clients();
        }
        limiter
            .check_key(&client)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets clients whose allowance is full again (the same as never having asked); the
    /// server calls it every minute.
    pub fn forget_idle_clients(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Clients with a partly used allowance.
    pub fn tracked_clients(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }
}

/// Authentication, then the client's rate limit.
pub async fn guard(State(access): State<Arc<Access>>, request: Request, next: Next) -> Response {
    if !access.authorized(
        request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    ) {
        let mut r = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong credentials",
            Some("Authorization"),
        )
        .into_response();
        if let Ok(v) = HeaderValue::from_str(access.scheme) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        return r;
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let client = access.client(peer, request.headers());
    if let Err(wait) = access.take(client) {
        let limit = access.limit;
        let mut r = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "rate limit: {} requests per second per client (bursts of {})",
                limit.per_second, limit.burst
            ),
            None,
        )
        .into_response();
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        return r;
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn behind(proxies: &[&str]) -> Arc<Access> {
        Access::new(AccessSettings {
            trusted_proxies: proxies.iter().filter_map(|p| p.parse().ok()).collect(),
            ..AccessSettings::default()
        })
    }

    fn forwarded(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert("x-forwarded-for", v);
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies_and_only_up_to_the_first_untrusted_hop()
    {
        let access = behind(&["10.0.0.0/8"]);
        // From the proxy: the address it was asked by.
        assert_eq!(
            access.client(Some(ip("10.0.0.2")), &forwarded("203.0.113.7")),
            ip("203.0.113.7")
        );
        // A client's own claim to the left of the real hop is ignored.
        assert_eq!(
            access.client(
                Some(ip("10.0.0.2")),
                &forwarded("198.51.100.1, 203.0.113.7, 10.0.0.9")
            ),
            ip("203.0.113.7")
        );
        // Straight from a client: the header is whatever it wants, so it is not read.
        assert_eq!(
            access.client(Some(ip("203.0.113.7")), &forwarded("10.0.0.1")),
            ip("203.0.113.7")
        );
        // Garbage ends the chain at the last believable hop.
        assert_eq!(
            access.client(Some(ip("10.0.0.2")), &forwarded("203.0.113.7, not-an-ip")),
            ip("10.0.0.2")
        );
        // No proxies configured: never read.
        assert_eq!(
            behind(&[]).client(Some(ip("10.0.0.2")), &forwarded("203.0.113.7")),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn each_client_has_its_own_allowance_and_idle_ones_are_forgotten() {
        let access = Access::new(AccessSettings {
            rate_limit: RateLimit {
                per_second: 1000.0,
                burst: 2,
            },
            ..AccessSettings::default()
        });
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        assert!(access.take(a).is_ok() && access.take(a).is_ok());
        let wait = access.take(a).err();
        assert!(
            wait.is_some_and(|w| w <= Duration::from_millis(1)),
            "{wait:?}"
        );
        assert!(
            access.take(b).is_ok(),
            "another client is not limited by the first"
        );
        assert_eq!(access.tracked_clients(), 2);
        std::thread::sleep(Duration::from_millis(20));
        access.forget_idle_clients();
        assert_eq!(access.tracked_clients(), 0);
        assert!(Access::open().take(a).is_ok());
    }
}
