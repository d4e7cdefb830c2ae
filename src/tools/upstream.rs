//! `ringfwd upstream drain|up|down|weight RULE MEMBER [N]`: the member API
//! (`POST /upstreams/RULE/MEMBER?…`) from the command line, with the admin token read from a
//! file so that it never shows in `ps` or a shell history.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

use super::ToolError;
use crate::config::{self, DEFAULT_ADMIN};

/// The admin endpoint answers in milliseconds; a member command waits at most for a reload
/// in progress.
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct UpstreamArgs {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// No new connections to MEMBER; its live connections run to their end.
    Drain(Target),
    /// Back into rotation (as its health allows).
    Up(Target),
    /// Out of rotation as if its health check failed.
    Down(Target),
    /// Set MEMBER's weight (1..=1000) until set again or the config changes that weight.
    Weight(WeightTarget),
}

#[derive(Debug, Args)]
pub struct Target {
    /// Rule name (RULE/ROUTE for one SNI route's pool).
    pub rule: String,
    /// Member: its address (10.0.0.1:80) or its name as in the config (api.svc:80).
    pub member: String,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Args)]
pub struct WeightTarget {
    /// Rule name (RULE/ROUTE for one SNI route's pool).
    pub rule: String,
    /// Member: its address (10.0.0.1:80) or its name as in the config (api.svc:80).
    pub member: String,
    /// The new weight, 1..=1000.
    #[arg(value_parser = clap::value_parser!(u32).range(1..=i64::from(config::MAX_WEIGHT)))]
    pub weight: u32,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Admin address of the forwarder (its `admin` setting).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADMIN)]
    pub admin: String,
    /// File holding the admin token (the forwarder's `admin_token_file`).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

impl UpstreamArgs {
    /// `(rule, member, query, admin)` of the request.
    fn request(&self) -> (&str, &str, String, &AdminArgs) {
        match &self.action {
            Action::Drain(t) => (&t.rule, &t.member, "state=drain".into(), &t.admin),
            Action::Up(t) => (&t.rule, &t.member, "state=up".into(), &t.admin),
            Action::Down(t) => (&t.rule, &t.member, "state=down".into(), &t.admin),
            Action::Weight(t) => (&t.rule, &t.member, format!("weight={}", t.weight), &t.admin),
        }
    }

    /// The request path, each name percent-encoded (`RULE/ROUTE` keeps its slash).
    pub fn path(&self) -> String {
        let (rule, member, query, _) = self.request();
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let rule: Vec<String> = rule.split('/').map(enc).collect();
        format!("/upstreams/{}/{}?{query}", rule.join("/"), enc(member))
    }
}

/// The token in `path`: its content without surrounding white space.
///
/// # Errors
/// The file cannot be read, or holds nothing.
pub fn read_token(path: &Path) -> Result<String, ToolError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--token-file: cannot read {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("--token-file: {} is empty", path.display()).into());
    }
    Ok(token.to_string())
}

/// Runs the tool: prints what the forwarder changed.
///
/// # Errors
/// A bad address or token file, the forwarder cannot be reached, or it refused the command
/// (its answer is the error).
pub fn run(args: UpstreamArgs) -> Result<(), ToolError> {
    let (_, _, _, admin) = args.request();
    let addr = config::resolve_one(&admin.admin).map_err(|m| format!("--admin: {m}"))?;
    let token = admin.token_file.as_deref().map(read_token).transpose()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answer = rt.block_on(post(addr, &args.path(), token.as_deref()))?;
    print!("{answer}");
    Ok(())
}

async fn post(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<String, ToolError> {
    let work = async {
        let (mut sender, conn) = super::admin_connect(addr).await?;
        let mut req = hyper::Request::post(path).header(hyper::header::HOST, addr.to_string());
        if let Some(t) = token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new())?)
            .await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        conn.abort();
        let body = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            return Err(format!("{addr} answered {status}: {}", body.trim()).into());
        }
        Ok(body)
    };
    match tokio::time::timeout(TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("{addr}: no answer within {TIMEOUT:?}").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        args: UpstreamArgs,
    }

    fn parse(args: &[&str]) -> Result<UpstreamArgs, clap::Error> {
        Wrap::try_parse_from(std::iter::once("upstream").chain(args.iter().copied()))
            .map(|w| w.args)
    }

    #[test]
    fn each_verb_makes_its_request() {
        let a = parse(&["drain", "web", "10.0.0.1:80"]).unwrap();
        assert_eq!(a.path(), "/upstreams/web/10.0.0.1%3A80?state=drain");
        let (_, _, _, admin) = a.request();
        assert_eq!(admin.admin, DEFAULT_ADMIN);
        let a = parse(&[
            "weight",
            "tls/api",
            "[::1]:443",
            "5",
            "--admin",
            "127.0.0.1:1",
        ])
        .unwrap();
        assert_eq!(a.path(), "/upstreams/tls/api/%5B%3A%3A1%5D%3A443?weight=5");
        // The server reads back what the client wrote.
        let (rest, query) = a
            .path()
            .split_once('?')
            .map(|(p, q)| (p.to_string(), q.to_string()))
            .unwrap();
        let cmd = crate::upstream::admin::Command::parse(
            rest.strip_prefix("/upstreams/").unwrap(),
            &query,
        )
        .unwrap();
        assert_eq!(
            (cmd.rule.as_str(), cmd.route.as_deref(), cmd.member.as_str()),
            ("tls", Some("api"), "[::1]:443")
        );
        assert!(parse(&["weight", "web", "m", "0"]).is_err());
        assert!(parse(&["weight", "web", "m", "1001"]).is_err());
        assert!(parse(&["maint", "web", "m"]).is_err());
        let a = parse(&["up", "web", "m", "--token-file", "/x"]).unwrap();
        assert_eq!(a.request().3.token_file.as_deref(), Some(Path::new("/x")));
    }
}
