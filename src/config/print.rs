//! The effective configuration as TOML, the way `ringfwd check` prints it: every default
//! spelled out, what each member resolved to as a comment.

use super::model::*;
use super::units::format_duration;

impl Config {
    /// The effective configuration as TOML, the way `ringfwd check` prints it.
    pub fn to_toml(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "workers = {}",
            self.workers
                .map_or("\"auto\"".to_string(), |n| n.to_string())
        );
        let _ = writeln!(out, "engine = {:?}", self.engine.as_str());
        let _ = writeln!(out, "mode = {:?}", self.mode.as_str());
        let _ = writeln!(
            out,
            "shutdown_grace = {:?}",
            format_duration(self.shutdown_grace)
        );
        let _ = writeln!(
            out,
            "shutdown_delay = {:?}",
            format_duration(self.shutdown_delay)
        );
        match self.reload_drain_timeout {
            Some(t) => {
                let _ = writeln!(out, "reload_drain_timeout = {:?}", format_duration(t));
            }
            None => {
                let _ = writeln!(
                    out,
                    "# reload_drain_timeout unset: old connections run to their end"
                );
            }
        }
        if let Some(a) = self.admin {
            let _ = writeln!(out, "admin = \"{a}\"");
        }
        let _ = writeln!(out, "admin_allow_remote = {}", self.admin_allow_remote);
        if let Some((path, _)) = &self.admin_token {
            let _ = writeln!(out, "admin_token_file = {:?}", path.display().to_string());
        }
        let _ = writeln!(
            out,
            "log_format = {:?}",
            match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
        );
        let _ = writeln!(out, "access_log = {}", self.access_log);
        if let Some(h) = &self.hdr_log {
            let _ = writeln!(out, "hdr_log = {:?}", h.path.display().to_string());
            let _ = writeln!(out, "hdr_log_interval = {:?}", format_duration(h.interval));
        }
        if let Some(r) = &self.run_as {
            let _ = writeln!(out, "user = {:?}", r.user);
            let _ = writeln!(out, "group = {:?}", r.group);
        }
        if let Some(p) = &self.control_socket {
            let _ = writeln!(out, "control_socket = {:?}", p.display().to_string());
        }
        if self.watch_config {
            let _ = writeln!(out, "watch_config = true");
        }
        let u = &self.uring;
        let _ = writeln!(out, "\n[uring]");
        let _ = writeln!(out, "ring_entries = {}", u.ring_entries);
        let _ = writeln!(out, "buffer_size = \"{}\"", u.buffer_size);
        let _ = writeln!(out, "buffers = {}", u.buffers);
        let _ = writeln!(out, "pipe_size = \"{}\"", u.pipe_size);
        let _ = writeln!(out, "pipes = {}", u.pipes);
        let _ = writeln!(out, "auto_up_reads = {}", u.auto_up_reads);
        let _ = writeln!(out, "auto_down_pumps = {}", u.auto_down_pumps);
        let _ = writeln!(out, "pin = {}", u.pin);
        let _ = writeln!(out, "busy_poll = \"{}us\"", u.busy_poll.as_micros());
        let _ = writeln!(out, "wait = \"{}\"", u.wait.as_str());
        for r in &self.rules {
            let _ = writeln!(out, "\n[[rule]]");
            let _ = writeln!(out, "name = {:?}", r.name);
            let _ = writeln!(out, "listen = \"{}\"", r.listen);
            match &r.upstream {
                Some(up) => write_upstream(&mut out, up, r.listen.count),
                None => {
                    let _ = writeln!(
                        out,
                        "# no upstream: a connection no route matches is rejected (no_route)"
                    );
                }
            }
            let _ = writeln!(out, "mptcp = {}", r.mptcp);
            let _ = writeln!(out, "max_connections = {}", r.max_connections);
            let _ = writeln!(out, "nodelay = {}", r.tcp.nodelay);
            match r.tcp.keepalive {
                None => {
                    let _ = writeln!(out, "keepalive = false");
                }
                Some(k) => {
                    let mut parts = Vec::new();
                    if let Some(d) = k.idle {
                        parts.push(format!("idle = {:?}", format_duration(d)));
                    }
                    if let Some(d) = k.interval {
                        parts.push(format!("interval = {:?}", format_duration(d)));
                    }
                    if let Some(c) = k.count {
                        parts.push(format!("count = {c}"));
                    }
                    let _ = writeln!(out, "keepalive = {{ {} }}", parts.join(", "));
                }
            }
            if let Some(l) = r.tcp.linger {
                let _ = writeln!(out, "linger = {:?}", format_duration(l));
            }
            if let Some(b) = r.tcp.recv_buffer {
                let _ = writeln!(out, "recv_buffer = \"{b}\"");
            }
            if let Some(b) = r.tcp.send_buffer {
                let _ = writeln!(out, "send_buffer = \"{b}\"");
            }
            for (key, rate) in [
                ("upload_rate", r.tcp.upload_rate),
                ("download_rate", r.tcp.download_rate),
            ] {
                match rate {
                    Some(b) => {
                        let _ = writeln!(out, "{key} = \"{b}/s\"");
                    }
                    None => {
                        let _ = writeln!(out, "# {key}: unset (no cap)");
                    }
                }
            }
            let _ = writeln!(
                out,
                "connect_timeout = {:?}",
                format_duration(r.connect_timeout)
            );
            let _ = writeln!(
                out,
                "idle_timeout = {:?}",
                r.idle_timeout.map_or("0s".to_string(), format_duration)
            );
            let _ = writeln!(
                out,
                "first_byte_timeout = {:?}",
                r.first_byte_timeout()
                    .map_or("0s".to_string(), format_duration)
            );
            if let Some(t) = &r.tap {
                let _ = writeln!(out, "tap = {:?}", t.display().to_string());
            }
            write_edge(&mut out, r);
            // A sub-table ends the rule's own keys, so it comes last.
            if let Some(h) = r.upstream.as_ref().and_then(|u| u.health_check.as_ref()) {
                write_health_check(&mut out, "rule.health_check", h);
            }
            for route in &r.routes {
                let _ = writeln!(out, "\n[[rule.route]]");
                let _ = writeln!(out, "name = {:?}", route.name);
                let _ = writeln!(out, "sni = {:?}", route.sni);
                write_upstream(&mut out, &route.upstream, r.listen.count);
                if let Some(h) = &route.upstream.health_check {
                    write_health_check(&mut out, "rule.route.health_check", h);
                }
            }
        }
        out
    }
}

fn write_health_check(out: &mut String, table: &str, h: &HealthCheck) {
    use std::fmt::Write;
    let _ = writeln!(out, "\n[{table}]");
    let _ = writeln!(out, "interval = {:?}", format_duration(h.interval));
    let _ = writeln!(out, "timeout = {:?}", format_duration(h.timeout));
    let _ = writeln!(out, "rise = {}", h.rise);
    let _ = writeln!(out, "fall = {}", h.fall);
    match &h.send {
        Some(v) => {
            let _ = writeln!(out, "send = {}", toml_string(v));
        }
        None => {
            let _ = writeln!(out, "# send: unset, nothing is written");
        }
    }
    match &h.expect {
        Some(v) => {
            let _ = writeln!(out, "expect = {}", toml_string(v));
        }
        None => {
            let _ = writeln!(out, "# expect: unset, a completed connect passes");
        }
    }
}

/// `v` as a TOML basic string, control characters escaped.
fn toml_string(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A rule's pool keys: members as inline tables, each followed by what it resolved to.
fn write_upstream(out: &mut String, up: &Upstream, listen_ports: u16) {
    use std::fmt::Write;
    let _ = writeln!(out, "upstream = [");
    for m in &up.members {
        let _ = writeln!(
            out,
            "    {{ addr = {:?}, weight = {}, backup = {} }},",
            m.range_text(up.one_to_one.then_some(listen_ports)),
            m.weight,
            m.backup
        );
    }
    let _ = writeln!(out, "]");
    for m in &up.members {
        if m.addrs.is_empty() {
            let _ = writeln!(
                out,
                "# member {:?} does not resolve now: down until it resolves",
                m.text
            );
            continue;
        }
        let addrs: Vec<String> = m.addrs.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "# member {:?} resolves to {}",
            m.text,
            addrs.join(", ")
        );
    }
    let _ = writeln!(out, "balance = {:?}", up.balance.as_str());
    let _ = writeln!(out, "connect_retries = {}", up.connect_retries);
    let _ = writeln!(out, "max_fails = {}", up.max_fails);
    let _ = writeln!(out, "fail_timeout = {:?}", format_duration(up.fail_timeout));
    let _ = writeln!(
        out,
        "resolve_interval = {:?}",
        up.resolve_interval
            .map_or("0s".to_string(), format_duration)
    );
    write_egress(out, &up.egress);
}

/// A pool's upstream-side keys, every one printed (unset ones as a comment saying what the
/// kernel does instead).
fn write_egress(out: &mut String, e: &crate::config::Egress) {
    use std::fmt::Write;
    let _ = writeln!(out, "transparent = {}", e.transparent);
    match e.source {
        Some(ip) => {
            let _ = writeln!(out, "source = \"{ip}\"");
        }
        None if e.transparent => {
            let _ = writeln!(out, "# source: each client's own address (transparent)");
        }
        None => {
            let _ = writeln!(out, "# source: unset (the kernel picks the address)");
        }
    }
    match e.mark {
        Some(m) => {
            let _ = writeln!(out, "mark = {m}");
        }
        None => {
            let _ = writeln!(out, "# mark: unset (no SO_MARK)");
        }
    }
    match &e.interface {
        Some(i) => {
            let _ = writeln!(out, "interface = {}", toml_string(i));
        }
        None => {
            let _ = writeln!(
                out,
                "# interface: unset (the routing table picks the device)"
            );
        }
    }
    let _ = writeln!(out, "upstream_mptcp = {}", e.mptcp);
}

/// A rule's edge-admission keys, every one printed (unset limits as a comment), so that
/// `check` shows the effective ACLs and limits.
fn write_edge(out: &mut String, r: &Rule) {
    use std::fmt::Write;
    let list = |out: &mut String, key: &str, l: &[crate::vocab::Cidr]| {
        if l.is_empty() {
            let _ = writeln!(out, "{key} = []");
        } else {
            let _ = writeln!(out, "{key} = [");
            for c in l {
                let _ = writeln!(out, "    \"{c}\",");
            }
            let _ = writeln!(out, "]");
        }
    };
    let _ = writeln!(out, "proxy_protocol = {:?}", r.proxy_protocol.as_str());
    match &r.accept_proxy {
        None => {
            let _ = writeln!(out, "accept_proxy = false");
        }
        Some(a) => {
            let _ = writeln!(out, "accept_proxy = true");
            list(out, "proxy_trusted", &a.trusted);
        }
    }
    if r.accept_proxy.is_some() || !r.routes.is_empty() {
        let _ = writeln!(
            out,
            "proxy_header_timeout = {:?}",
            format_duration(r.header_timeout)
        );
    }
    let a = &r.admission;
    list(out, "allow", &a.allow);
    list(out, "deny", &a.deny);
    match a.max_connections_per_ip {
        None => {
            let _ = writeln!(out, "# max_connections_per_ip: unset, no limit");
        }
        Some(n) => {
            let _ = writeln!(out, "max_connections_per_ip = {n}");
        }
    }
    match a.max_new_connections_per_ip {
        None => {
            let _ = writeln!(out, "# max_new_connections_per_ip: unset, no limit");
        }
        Some(rate) => {
            let _ = writeln!(out, "max_new_connections_per_ip = \"{rate}\"");
            let _ = writeln!(
                out,
                "# a new client address may open {} at once, then one every {:?}",
                rate.burst(),
                rate.interval()
            );
        }
    }
    let _ = writeln!(out, "per_ip_prefix_v6 = {}", a.per_ip_prefix_v6);
    let _ = writeln!(out, "per_ip_prefix_v4 = {}", a.per_ip_prefix_v4);
}
