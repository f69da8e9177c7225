//! Objects named `s3://BUCKET/KEY`, fetched with ranged GETs signed with AWS Signature
//! Version 4 (presigned URLs made by `rusty-s3`).
//!
//! Everything a read must prove (206 and the exact Content-Range, the ETag pinned at
//! open, retries within the deadline) is `http.rs`'s; this module only says where an
//! object is, signs each request anew (so that a retry after a long stall never carries
//! an expired signature), and turns S3's XML error replies into messages that say what
//! to do.
//!
//! Where and as whom follows the AWS conventions ([`S3Config::from_env`]):
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`; `AWS_REGION`
//! (else `AWS_DEFAULT_REGION`, else us-east-1); `AWS_ENDPOINT_URL_S3` (else
//! `AWS_ENDPOINT_URL`) for an S3-compatible server, whose buckets are then addressed by
//! path. Without credentials, requests are anonymous (public objects).

use super::cache::RemoteStorage;
use super::has_scheme;
use super::options::RemoteOptions;
use super::ranged_get::{Failure, RangedGet, Target};
use crate::error::{Error, Result};
use rusty_s3::actions::{GetObject, S3Action};
use rusty_s3::{Bucket, Credentials, UrlStyle};
use std::fmt;
use std::time::Duration;

/// Whether `name` is an `s3://` URL.
pub(crate) fn is_s3_url(name: &str) -> bool {
    has_scheme(name, "s3://")
}

/// Where S3 objects are read from, and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// The service's URL, for an S3-compatible server (buckets are then addressed by
    /// path: `ENDPOINT/BUCKET/KEY`). `None` is AWS itself, `https://s3.REGION.amazonaws.com`,
    /// with the bucket in the host name.
    pub endpoint: Option<String>,
    /// The region requests are signed for.
    pub region: String,
    /// Who signs the requests; `None` sends them unsigned (public objects only).
    pub credentials: Option<S3Credentials>,
}

/// An access key, as AWS hands them out.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    /// The access key ID.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
    /// The session token of temporary credentials, sent as `X-Amz-Security-Token`.
    pub session_token: Option<String>,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret and the token never reach a log.
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("session_token", &self.session_token.as_ref().map(|_| "..."))
            .finish_non_exhaustive()
    }
}

/// The region when none is set, as the AWS tools have it.
const DEFAULT_REGION: &str = "us-east-1";

impl S3Config {
    /// The configuration the AWS environment variables give: `AWS_ENDPOINT_URL_S3` else
    /// `AWS_ENDPOINT_URL`; `AWS_REGION` else `AWS_DEFAULT_REGION` else us-east-1;
    /// `AWS_ACCESS_KEY_ID` with `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`), or
    /// anonymous when neither is set. An empty variable counts as unset.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok()).map_err(Error::InvalidArgument)
    }

    /// [`S3Config::from_env`] over any source of variables.
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let endpoint = var("AWS_ENDPOINT_URL_S3").or_else(|| var("AWS_ENDPOINT_URL"));
        let region = var("AWS_REGION")
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| DEFAULT_REGION.to_string());
        let credentials = match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(access_key_id), Some(secret_access_key)) => Some(S3Credentials {
                access_key_id,
                secret_access_key,
                session_token: var("AWS_SESSION_TOKEN"),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(
                    "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: set \
                            both, or neither for anonymous access"
                        .into(),
                )
            }
            (None, Some(_)) => {
                return Err(
                    "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not: set \
                            both, or neither for anonymous access"
                        .into(),
                )
            }
        };
        Ok(Self {
            endpoint,
            region,
            credentials,
        })
    }

    /// The bucket, addressed as this configuration says, and the endpoint it is on.
    fn bucket(&self, name: &str) -> Result<(Bucket, url::Url), String> {
        if self.region.is_empty()
            || !self
                .region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "'{}' is not a region name (AWS_REGION): use one such as us-east-1",
                self.region
            ));
        }
        let (endpoint, style) = match &self.endpoint {
            Some(e) => {
                let mut url: url::Url = e
                    .parse()
                    .ok()
                    .filter(|u: &url::Url| {
                        matches!(u.scheme(), "http" | "https") && u.host_str().is_some()
                    })
                    .ok_or_else(|| {
                        format!(
                            "the S3 endpoint '{e}' (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL) \
                             is not an http:// or https:// URL"
                        )
                    })?;
                // A path in the endpoint is a prefix the bucket goes under, not a name to
                // replace.
                if !url.path().ends_with('/') {
                    let path = format!("{}/", url.path());
                    url.set_path(&path);
                }
                (url, UrlStyle::Path)
            }
            None => {
                let url = format!("https://s3.{}.amazonaws.com", self.region)
                    .parse()
                    .map_err(|e| format!("the region '{}' makes no URL: {e}", self.region))?;
                // A dotted name would not match the wildcard certificate as a host name.
                let style = if name.contains('.') {
                    UrlStyle::Path
                } else {
                    UrlStyle::VirtualHost
                };
                (url, style)
            }
        };
        Bucket::new(
            endpoint.clone(),
            style,
            name.to_string(),
            self.region.clone(),
        )
        .map(|b| (b, endpoint))
        .map_err(|e| format!("the bucket '{name}' cannot be addressed: {e:?}"))
    }
}

/// Splits `s3://BUCKET/KEY`, refusing what S3 could not name, or what the request's URL
/// would not carry as it is.
fn parse_s3_url(url: &str) -> Result<(&str, &str), String> {
    let rest = url
        .get(5..)
        .filter(|_| is_s3_url(url))
        .ok_or("not an s3:// URL")?;
    let (bucket, key) = rest
        .split_once('/')
        .ok_or("an s3:// URL names an object as s3://BUCKET/KEY, and this one has no key")?;
    if bucket.is_empty()
        || bucket.len() > 255
        || !bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(format!(
            "'{bucket}' is not a bucket name (letters, digits, '.', '-' and '_')"
        ));
    }
    if key.is_empty() {
        return Err(
            "an s3:// URL names an object as s3://BUCKET/KEY, and this one has no key".into(),
        );
    }
    // A URL's path would lose these on the way (dot segments are resolved, and a
    // leading slash would replace the bucket's part of the path).
    if key.starts_with('/') || key.split('/').any(|s| s == "." || s == "..") {
        return Err(format!(
            "the key '{key}' starts with '/' or has '.' or '..' segments, which cannot be \
             requested as they are"
        ));
    }
    if key.len() > 1024 || key.chars().any(char::is_control) {
        return Err(format!(
            "'{key}' is not a key (at most 1024 bytes, no control characters)"
        ));
    }
    Ok((bucket, key))
}

/// A read-only object behind an `s3://BUCKET/KEY` URL, as
/// [`Storage`](crate::storage::Storage).
///
/// Reads are cached in chunks (see [`RemoteOptions`]); writes fail with
/// [`std::io::ErrorKind::ReadOnlyFilesystem`].
#[derive(Debug)]
pub struct S3Storage {
    inner: RemoteStorage<RangedGet<S3Object>>,
}

impl S3Storage {
    /// Opens the object at `url` as the AWS environment variables say
    /// ([`S3Config::from_env`]).
    pub fn open(url: &str, opts: &RemoteOptions) -> Result<Self> {
        let config = S3Config::from_env().map_err(|e| Error::Remote {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        Self::open_with(url, &config, opts)
    }

    /// Opens the object at `url` (`s3://BUCKET/KEY`) on the service `config` names:
    /// finds its size with a one-byte ranged GET and pins its ETag.
    pub fn open_with(url: &str, config: &S3Config, opts: &RemoteOptions) -> Result<Self> {
        let remote = |reason: String| Error::Remote {
            url: url.to_string(),
            reason,
        };
        opts.validate().map_err(remote)?;
        let (bucket, key) = parse_s3_url(url).map_err(remote)?;
        let object = S3Object::new(url, config, bucket, key).map_err(remote)?;
        let source = RangedGet::open(object, opts).map_err(remote)?;
        Ok(Self {
            inner: RemoteStorage::new(source, opts),
        })
    }

    /// The URL, as given.
    pub fn url(&self) -> &str {
        &self.inner.source().target.name
    }
}

super::delegate_storage!(S3Storage);

/// One object, and how to sign a GET of it.
pub(crate) struct S3Object {
    /// The `s3://` URL, for messages.
    name: String,
    bucket: Bucket,
    /// The service's URL, for messages.
    endpoint: url::Url,
    key: String,
    credentials: Option<Credentials>,
    anonymous: bool,
}

impl fmt::Debug for S3Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Object")
            .field("name", &self.name)
            .field("base_url", &self.bucket.base_url().as_str())
            .field("endpoint", &self.endpoint.as_str())
            .field("anonymous", &self.anonymous)
            .finish_non_exhaustive()
    }
}

/// How long a signature stays good. Each attempt is signed as it starts, so this only
/// needs to cover the time a request takes to reach the server; a little more allows
/// for clocks that disagree.
const SIGNATURE_LIFETIME: Duration = Duration::from_secs(15 * 60);

impl S3Object {
    /// The object at `url` (`s3://BUCKET/KEY`) on the service `config` names.
    pub(crate) fn at(url: &str, config: &S3Config) -> Result<Self, String> {
        let (bucket, key) = parse_s3_url(url)?;
        Self::new(url, config, bucket, key)
    }

    /// The bucket, addressed.
    pub(crate) fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    /// The key.
    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    /// Who signs requests; `None` for anonymous ones.
    pub(crate) fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    fn new(name: &str, config: &S3Config, bucket: &str, key: &str) -> Result<Self, String> {
        let (bucket, endpoint) = config.bucket(bucket)?;
        // The key must come out as the tail of the bucket's URL, nothing resolved away.
        match bucket.object_url(key) {
            Ok(u) if u.as_str().starts_with(bucket.base_url().as_str()) && u.query().is_none() => {}
            _ => return Err(format!("the key '{key}' cannot be put in a request URL")),
        }
        let credentials = config.credentials.as_ref().map(|c| match &c.session_token {
            Some(token) => Credentials::new_with_token(
                c.access_key_id.clone(),
                c.secret_access_key.clone(),
                token.clone(),
            ),
            None => Credentials::new(c.access_key_id.clone(), c.secret_access_key.clone()),
        });
        Ok(Self {
            name: name.to_string(),
            bucket,
            endpoint,
            key: key.to_string(),
            anonymous: credentials.is_none(),
            credentials,
        })
    }

    /// Where the object was looked for, and, when the endpoint has a path, that it
    /// may be the cause: the bucket goes under that path, which S3 servers do not expect.
    fn looked_at(&self) -> String {
        let path = self.endpoint.path();
        let mut s = format!(
            "at the endpoint {} (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL)",
            self.endpoint
        );
        if path != "/" {
            s += &format!(
                "; that endpoint has a path ({path}) and the bucket was requested under it \
                 ({}{}/...): an S3 endpoint is usually the server's address alone",
                self.endpoint,
                self.bucket.name()
            );
        }
        s
    }

    /// What to check when the server refused the credentials.
    fn check_credentials(&self) -> &'static str {
        if self.anonymous {
            "no credentials are set, so the request was anonymous: set AWS_ACCESS_KEY_ID \
             and AWS_SECRET_ACCESS_KEY"
        } else {
            "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        }
    }
}

impl Target for S3Object {
    fn name(&self) -> &str {
        &self.name
    }

    fn endpoint(&self) -> Option<String> {
        Some(self.endpoint.to_string())
    }

    fn address(&self) -> String {
        // The same s3:// name on two endpoints is two objects.
        self.bucket
            .object_url(&self.key)
            .map(|u| u.to_string())
            .unwrap_or_else(|_| format!("{}{}/{}", self.endpoint, self.bucket.name(), self.key))
    }

    fn url(&self) -> Result<String, String> {
        let url = match &self.credentials {
            Some(c) => GetObject::new(&self.bucket, Some(c), &self.key).sign(SIGNATURE_LIFETIME),
            // Unsigned; rusty-s3 would leave an empty query ('?') on it.
            None => self
                .bucket
                .object_url(&self.key)
                .map_err(|e| e.to_string())?,
        };
        Ok(url.to_string())
    }

    fn refusal(&self, status: u16, body: &[u8]) -> Failure {
        let error = S3Error::parse(body);
        let code = error.code.as_deref().unwrap_or("");
        // "403 SignatureDoesNotMatch: The request signature we calculated..."
        let said = match (&error.code, &error.message) {
            (Some(c), Some(m)) => format!("{status} {c}: {m}"),
            (Some(c), None) => format!("{status} {c}"),
            (None, _) => format!("{status}"),
        };
        let bucket = self.bucket.name();
        match (status, code) {
            (_, "NoSuchBucket") => Failure::fatal(format!(
                "the bucket '{bucket}' does not exist ({said}) {}: check the bucket's name \
                 and the endpoint (AWS_ENDPOINT_URL_S3, AWS_REGION)",
                self.looked_at()
            )),
            (_, "NoSuchKey") | (404, "") => Failure::fatal(format!(
                "there is no object '{}' in the bucket '{bucket}' ({said}) {}: check the key",
                self.key,
                self.looked_at()
            )),
            (
                _,
                "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "AuthorizationQueryParametersError",
            ) => Failure::fatal(format!(
                "the server refused the credentials ({said}): check AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY"
            )),
            (_, "ExpiredToken" | "InvalidToken" | "TokenRefreshRequired") => {
                Failure::fatal(format!(
                    "the server refused the session token ({said}): check AWS_SESSION_TOKEN, \
                     or renew the temporary credentials"
                ))
            }
            (_, "RequestTimeTooSkewed") => Failure::fatal(format!(
                "this host's clock is too far from the server's ({said}): set the clock"
            )),
            (_, "AuthorizationHeaderMalformed" | "PermanentRedirect" | "IncorrectEndpoint")
            | (301, _) => Failure::fatal(format!(
                "the bucket is in another region than {} ({said}): set AWS_REGION{}",
                self.bucket.region(),
                error
                    .region
                    .as_deref()
                    .map(|r| format!(" to {r}"))
                    .unwrap_or_default()
            )),
            (401 | 403, _) => Failure::fatal(format!(
                "access denied ({said}): {}",
                self.check_credentials()
            )),
            (_, "SlowDown") => Failure::transient(format!("the server asks to slow down ({said})")),
            _ => Failure::fatal(format!("the server answered {said} {}", self.looked_at())),
        }
    }
}

/// The parts of an S3 error reply (`<Error><Code>...</Code><Message>...</Message>...`)
/// that a message needs.
#[derive(Debug, Default, PartialEq, Eq)]
struct S3Error {
    code: Option<String>,
    message: Option<String>,
    region: Option<String>,
}

impl S3Error {
    /// Reads what it can from `body`, which may be anything (HTML from a proxy, a cut
    /// off reply, binary garbage): what is not there is `None`.
    fn parse(body: &[u8]) -> Self {
        let text = String::from_utf8_lossy(body);
        Self {
            code: xml_element(&text, "Code"),
            message: xml_element(&text, "Message"),
            region: xml_element(&text, "Region"),
        }
    }
}

/// The text of the first `<name>...</name>` in `text`, unescaped, tidied for a one-line
/// message and cut at 300 characters; `None` when absent or empty.
pub(crate) fn xml_element(text: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = text.find(&open)? + open.len();
    let len = text[start..].find(&close)?;
    let raw = &text[start..start + len];
    let unescaped = raw
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&");
    let mut tidy: String = unescaped
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .take(301)
        .collect();
    if tidy.chars().count() > 300 {
        tidy = tidy.chars().take(300).collect::<String>() + "...";
    }
    (!tidy.is_empty()).then_some(tidy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<S3Config, String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        S3Config::from_vars(|k| vars.get(k).cloned())
    }

    #[test]
    fn the_environment_follows_the_aws_conventions() {
        let c = config(&[]).unwrap();
        assert_eq!(c.endpoint, None);
        assert_eq!(c.region, "us-east-1");
        assert_eq!(c.credentials, None);

        let c = config(&[
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:1"),
            ("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_SESSION_TOKEN", "token"),
        ])
        .unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:2"));
        assert_eq!(c.region, "eu-west-1");
        let creds = c.credentials.unwrap();
        assert_eq!(creds.session_token.as_deref(), Some("token"));
        assert!(!format!("{creds:?}").contains("secret"));
        assert!(!format!("{creds:?}").contains("token\""));

        let c = config(&[
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:1"),
            ("AWS_ENDPOINT_URL_S3", ""),
            ("AWS_REGION", "ap-south-1"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
        ])
        .unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(c.region, "ap-south-1");

        let e = config(&[("AWS_ACCESS_KEY_ID", "AKID")]).unwrap_err();
        assert!(e.contains("AWS_SECRET_ACCESS_KEY is not"), "{e}");
        let e = config(&[("AWS_SECRET_ACCESS_KEY", "x")]).unwrap_err();
        assert!(e.contains("AWS_ACCESS_KEY_ID is not"), "{e}");
    }

    #[test]
    fn s3_urls_name_a_bucket_and_a_key() {
        assert_eq!(
            parse_s3_url("s3://b-1/dir/disk.qed"),
            Ok(("b-1", "dir/disk.qed"))
        );
        assert_eq!(parse_s3_url("S3://b/k"), Ok(("b", "k")));
        assert_eq!(parse_s3_url("s3://b/a key?#%x"), Ok(("b", "a key?#%x")));
        for bad in [
            "s3://",
            "s3://bucket",
            "s3://bucket/",
            "s3:///key",
            "s3://buc?ket/key",
            "s3://b/../k",
            "s3://b/a/./k",
            "s3://b//k",
            "s3://b/k\n",
            "http://b/k",
        ] {
            assert!(parse_s3_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn buckets_are_addressed_by_path_on_an_endpoint_and_by_host_on_aws() {
        let object = |config: &S3Config, bucket: &str, key: &str| {
            S3Object::new("s3://x/y", config, bucket, key).map(|o| o.url().unwrap())
        };
        let mut c = config(&[("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")]).unwrap();
        assert_eq!(
            object(&c, "bucket", "dir/a b?.qed").unwrap(),
            "http://127.0.0.1:9000/bucket/dir/a%20b%3F.qed"
        );
        c.endpoint = Some("http://127.0.0.1:9000/prefix".into());
        assert_eq!(
            object(&c, "bucket", "k").unwrap(),
            "http://127.0.0.1:9000/prefix/bucket/k"
        );
        let c = config(&[("AWS_REGION", "eu-west-1")]).unwrap();
        assert_eq!(
            object(&c, "bucket", "k").unwrap(),
            "https://bucket.s3.eu-west-1.amazonaws.com/k"
        );
        assert_eq!(
            object(&c, "my.bucket", "k").unwrap(),
            "https://s3.eu-west-1.amazonaws.com/my.bucket/k"
        );
        // Signed: every request carries a signature of its own time.
        let c = config(&[
            ("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000"),
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_SESSION_TOKEN", "tok"),
        ])
        .unwrap();
        let url = object(&c, "bucket", "k").unwrap();
        assert!(url.starts_with("http://127.0.0.1:9000/bucket/k?"), "{url}");
        for part in [
            "X-Amz-Signature=",
            "X-Amz-Credential=AKID",
            "X-Amz-Security-Token=tok",
        ] {
            assert!(url.contains(part), "{url}");
        }
        assert!(!url.contains("secret"), "{url}");

        for (var, value) in [
            ("AWS_ENDPOINT_URL_S3", "ftp://host"),
            ("AWS_ENDPOINT_URL_S3", "not a url"),
            ("AWS_REGION", "a/b"),
        ] {
            let c = config(&[(var, value)]).unwrap();
            let e = object(&c, "bucket", "k").unwrap_err();
            assert!(e.contains(value), "{e}");
        }
    }

    #[test]
    fn error_replies_are_read_for_their_code_and_message() {
        let xml = b"<?xml version=\"1.0\"?>\n<Error><Code>NoSuchKey</Code><Message>The \
                    specified key does not exist &amp; never\n did.</Message><Key>k</Key></Error>";
        assert_eq!(
            S3Error::parse(xml),
            S3Error {
                code: Some("NoSuchKey".into()),
                message: Some("The specified key does not exist & never did.".into()),
                region: None,
            }
        );
        for garbage in [
            &b""[..],
            b"<html>502 Bad Gateway</html>",
            b"<Code>",
            b"<Code></Code>",
            b"\xff\xfe<Code>\x00\x01",
            b"<Message><Code>x</Message>",
        ] {
            let e = S3Error::parse(garbage);
            assert_eq!(e.code, None, "{garbage:?}");
        }
        let long = format!("<Error><Message>{}</Message></Error>", "é".repeat(5000));
        let e = S3Error::parse(long.as_bytes());
        assert_eq!(e.message.unwrap().chars().count(), 303);
    }
}
