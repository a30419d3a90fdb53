//! `[server] storage` and `[redis]`: a folder on this host, or a Redis server replicas share,
//! with what a managed Redis needs (ACL user, password from a file or the environment, TLS with
//! a private CA, a key prefix, timeouts). A password is never part of the URL, so nothing that
//! shows the URL can show it.

use super::bounds::Wait;
use super::*;
use crate::config::raw::RawRedis;

/// A `[redis]` timeout: at most 5 minutes, as a command that takes longer is a Redis that is
/// down, and renewals then wait and retry.
const MAX_REDIS_WAIT: Wait = Wait::between(Wait::TIMEOUT.min, std::time::Duration::from_secs(300));

impl Validator<'_> {
    /// The local folder (the store itself, or a shared store's cache) and the shared store, if
    /// any. `env` reads `[redis] password_env`.
    pub(super) fn storage(
        &mut self,
        raw: &RawConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> (Option<PathBuf>, Option<RedisStorage>) {
        let s = &raw.server;
        let key = [Seg::Key("server"), Seg::Key("storage")];
        let text = s.storage.trim();
        if text.is_empty() {
            self.error(&key, "must name a folder, or a redis:// or rediss:// URL");
            return (None, None);
        }
        let scheme = text.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
        match scheme.as_deref() {
            None => {
                if raw.redis.is_some() {
                    self.warn(&[Seg::Key("redis")], "is read only when server.storage is a redis:// or rediss:// URL");
                }
                if s.storage_key_file.is_some() {
                    self.warn(
                        &[Seg::Key("server"), Seg::Key("storage_key_file")],
                        "seals keys in a shared store only; a folder keeps them in files of mode 0600",
                    );
                }
                (Some(PathBuf::from(&s.storage)), None)
            }
            Some("redis" | "rediss") => {
                let default = RawRedis::default();
                let redis = raw.redis.as_ref().unwrap_or(&default);
                let shared = self.redis(text, redis, env);
                self.storage_key_file(s.storage_key_file.as_deref(), shared.as_ref());
                let cache = redis.cache.trim();
                if cache.is_empty() {
                    self.error(&[Seg::Key("redis"), Seg::Key("cache")], "must name a folder");
                }
                (Some(PathBuf::from(cache)), shared)
            }
            Some(other) => {
                self.error(
                    &key,
                    format!("`{other}://` is not a store; use a folder path, or a redis:// or rediss:// URL"),
                );
                (None, None)
            }
        }
    }

    fn redis(&mut self, text: &str, r: &RawRedis, env: impl Fn(&str) -> Option<String>) -> Option<RedisStorage> {
        let before = self.problems.len();
        let key = [Seg::Key("server"), Seg::Key("storage")];
        let at = |name: &'static str| [Seg::Key("redis"), Seg::Key(name)];
        let mut url = match Url::parse(text) {
            Ok(url) if url.host_str().is_some_and(|h| !h.is_empty()) => url,
            _ => {
                self.error(&key, "is not a Redis URL such as \"redis://127.0.0.1:6379/0\"");
                return None;
            }
        };
        if url.password().is_some() {
            self.error(
                &key,
                "holds a password, which would show wherever the URL does; put it in [redis] password_file or password_env",
            );
        }
        if url.query().is_some() || url.fragment().is_some() {
            self.error(&key, "takes no query or fragment; [redis] holds the settings");
        }
        let db = url.path().trim_start_matches('/');
        if !db.is_empty() && db.parse::<u16>().is_err() {
            self.error(&key, format!("`/{db}` is not a database number such as /0"));
        }
        let username = match (url.username(), &r.username) {
            ("", user) => user.clone(),
            (in_url, None) => Some(in_url.to_string()),
            (_, Some(_)) => {
                self.error(&at("username"), "the URL names a user too; name it in one place");
                None
            }
        };
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let (password, password_from) = match (&r.password_file, &r.password_env) {
            (Some(_), Some(_)) => {
                self.error(&at("password_env"), "set password_file or password_env, not both");
                (None, None)
            }
            (Some(file), None) => match crate::fsutil::read_regular(std::path::Path::new(file)) {
                Ok(bytes) => match String::from_utf8(bytes) {
                    Ok(text) if !text.trim_end_matches(['\r', '\n']).is_empty() => (
                        Some(Secret(text.trim_end_matches(['\r', '\n']).to_string())),
                        Some(format!("password_file {file}")),
                    ),
                    Ok(_) => {
                        self.error(&at("password_file"), format!("{file} is empty"));
                        (None, None)
                    }
                    Err(_) => {
                        self.error(&at("password_file"), format!("{file} is not UTF-8 text"));
                        (None, None)
                    }
                },
                Err(e) => {
                    self.error(&at("password_file"), format!("{file}: {e}"));
                    (None, None)
                }
            },
            (None, Some(var)) => match env(var) {
                Some(value) if !value.is_empty() => (Some(Secret(value)), Some(format!("password_env {var}"))),
                _ => {
                    self.error(&at("password_env"), format!("the environment variable {var} is not set"));
                    (None, None)
                }
            },
            (None, None) => (None, None),
        };
        if r.ca_file.is_some() && url.scheme() == "redis" {
            self.warn(&at("ca_file"), "is used only with rediss:// (TLS); the URL is redis://");
        }
        let prefix_ok = !r.prefix.is_empty()
            && r.prefix.len() <= 64
            && r.prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b));
        if !prefix_ok {
            self.error(&at("prefix"), "must be 1 to 64 characters of letters, digits and - _ . : /");
        }
        for (name, wait) in [("connect_timeout", r.connect_timeout), ("command_timeout", r.command_timeout)] {
            self.wait(&at(name), wait, MAX_REDIS_WAIT);
        }
        (self.problems.len() == before).then(|| RedisStorage {
            url,
            username,
            password,
            password_from,
            ca_file: r.ca_file.as_deref().map(PathBuf::from),
            prefix: r.prefix.clone(),
            connect_timeout: r.connect_timeout,
            command_timeout: r.command_timeout,
        })
    }

    /// A key file for a shared store must open; without one, keys would be stored in clear.
    fn storage_key_file(&mut self, file: Option<&str>, shared: Option<&RedisStorage>) {
        let key = [Seg::Key("server"), Seg::Key("storage_key_file")];
        match file {
            Some(file) => {
                if let Err(e) = crate::seal::Sealer::load(std::path::Path::new(file)) {
                    self.error(&key, e.to_string());
                }
            }
            None => {
                let Some(shared) = shared else { return };
                let local = shared.url.host_str().is_some_and(crate::egress::is_loopback);
                let across = if shared.url.scheme() == "redis" && !local {
                    ", and cross the network in clear (redis://)"
                } else {
                    ""
                };
                self.warn(
                    &[Seg::Key("server"), Seg::Key("storage")],
                    format!("private keys would be stored in Redis in clear{across}; set server.storage_key_file to seal them"),
                );
            }
        }
    }
}
