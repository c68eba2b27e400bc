//! Prometheus metrics of all three binaries (issue 12), scraped with real `curl`: a relayed
//! tunnel moves the device's, the relay's and the client's counters; refusals show up by reason
//! and code; no label carries a token, a fingerprint or the client's own name.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;

use tunnel_testkit::servers::TestServer;
use tunnel_testkit::{World, read_ready};

use crate::stderr;

/// `curl -sS http://ADDR/metrics`.
fn scrape(addr: SocketAddr) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--fail", &format!("http://{addr}/metrics")])
        .output()
        .expect("curl is required (bash .ci/run installs it)");
    assert!(out.status.success(), "curl failed: {}", stderr(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// The value of the sample `series` (name and labels exactly as exposed), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// The metrics address from a ready file.
fn metrics_addr(ready: &serde_json::Value) -> SocketAddr {
    ready["metrics"]
        .as_str()
        .unwrap_or_else(|| panic!("no metrics address in {ready}"))
        .parse()
        .unwrap()
}

fn echo(addr: SocketAddr, len: usize) {
    let mut s = TcpStream::connect(addr).unwrap();
    let payload = vec![0x42u8; len];
    s.write_all(&payload).unwrap();
    let mut back = vec![0u8; len];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, payload);
}

#[test]
fn relayed_traffic_moves_the_counters_of_all_three() {
    assert!(
        tunnel_testkit::have("curl"),
        "curl is required (bash .ci/run installs it)"
    );
    let world = World::new();
    let echo_server = TestServer::echo();
    let relay_home = world.relay("relay");
    relay_home.append_config("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let relay = relay_home.start_in(None, "127.0.0.1:0");
    let relay_ready: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(world.path("relay.ready")).unwrap()).unwrap();
    let relay_metrics = metrics_addr(&relay_ready);

    let dev = world.device("dev", &[("echo", echo_server.addr)]);
    dev.append_config(
        "[network]\nmdns = false\n[transport]\nhole_punching = false\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let device_id = relay_home.attach(&dev, &relay);
    let client = world.client("cli");
    dev.add_user("alice", &client.fingerprint(), "Owner");
    let mut device = dev.start();
    dev.wait_attached(&mut device);
    let dev_ready: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(world.path("dev.ready")).unwrap()).unwrap();
    let dev_metrics = metrics_addr(&dev_ready);
    let token = dev.token("alice");
    client.pin_relayed(
        "cam",
        &device,
        &device_id,
        (&relay.addr.to_string(), &relay.fingerprint),
        &[],
        Some(&token),
    );

    let before = scrape(dev_metrics);
    assert!(
        before.contains("tunnel_build_info{binary=\"tunnel-device\",version="),
        "{before}"
    );
    assert!(
        value(&before, "tunnel_uptime_seconds").is_some(),
        "{before}"
    );
    assert_eq!(
        value(
            &before,
            "tunnel_device_tunnels_total{service=\"echo\",user=\"alice\"}"
        ),
        None
    );
    assert_eq!(
        must(&scrape(relay_metrics), "tunnel_relay_devices_attached"),
        1.0
    );

    // The client's own metrics, on a port it picks.
    let ready = world.path("open.ready");
    let mut cmd = Command::new(tunnel_testkit::bin("tunnel-client"));
    cmd.arg("--home")
        .arg(&client.home)
        .args(["open", "cam", "-L", "0:echo", "-L", "0:nope"])
        .args(["--metrics", "127.0.0.1:0", "--no-punch", "--ready-file"])
        .arg(&ready);
    let mut open = tunnel_testkit::Proc::spawn("open", cmd, &world.path("open.log"));
    let open_ready = read_ready(&ready, &mut open);
    let client_metrics = metrics_addr(&open_ready);
    let locals: Vec<SocketAddr> = open_ready["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["local"].as_str().unwrap().parse().unwrap())
        .collect();

    const LEN: usize = 300_000;
    echo(locals[0], LEN);
    echo(locals[0], LEN);
    // A service the device does not have: reset with its code, counted on both ends.
    assert!(tunnel_testkit::saw_reset(
        &mut TcpStream::connect(locals[1]).unwrap(),
        b"x"
    ));
    // A key on no user: refused at admission.
    let stranger = world.client("stranger");
    stranger.pin_raw("cam", &device.addr.to_string(), &device.fingerprint);
    assert_eq!(stranger.cmd(&["services", "cam"]).status.code(), Some(1));

    let d = tunnel_testkit::wait_for("the device's counters", tunnel_testkit::SOON, || {
        let d = scrape(dev_metrics);
        (value(
            &d,
            "tunnel_device_handshake_failures_total{reason=\"unknown_key\"}",
        ) == Some(1.0))
        .then_some(d)
    });
    assert_eq!(
        must(
            &d,
            "tunnel_device_tunnels_total{service=\"echo\",user=\"alice\"}"
        ),
        2.0
    );
    assert!(
        must(
            &d,
            "tunnel_device_tunnel_bytes_total{service=\"echo\",user=\"alice\",direction=\"to_service\"}"
        ) >= (2 * LEN) as f64
    );
    assert!(
        must(
            &d,
            "tunnel_device_tunnel_bytes_total{service=\"echo\",user=\"alice\",direction=\"to_client\"}"
        ) >= (2 * LEN) as f64
    );
    assert_eq!(
        must(
            &d,
            "tunnel_device_connections{locality=\"remote\",path=\"relayed\"}"
        ),
        1.0
    );
    assert!(
        must(
            &d,
            "tunnel_device_stream_resets_total{code=\"no_such_service\",by=\"device\"}"
        ) >= 1.0
    );
    assert!(must(&d, "tunnel_device_rtt_seconds_count") >= 1.0, "{d}");
    assert!(must(&d, "tunnel_device_cwnd_bytes_count") >= 1.0, "{d}");

    let r = scrape(relay_metrics);
    assert!(
        must(&r, "tunnel_relay_forwarded_bytes_total") >= (4 * LEN) as f64,
        "{r}"
    );
    assert_eq!(must(&r, "tunnel_relay_channels"), 1.0);
    assert!(r.contains("tunnel_build_info{binary=\"tunnel-relay\""));

    // The client counts a reset after it has reset the local socket: wait for it.
    let c = tunnel_testkit::wait_for("the client's reset count", tunnel_testkit::SOON, || {
        let c = scrape(client_metrics);
        value(
            &c,
            "tunnel_client_stream_resets_total{code=\"no_such_service\",by=\"device\"}",
        )
        .is_some()
        .then_some(c)
    });
    assert_eq!(
        must(
            &c,
            "tunnel_client_connected{device=\"cam\",path=\"relayed\"}"
        ),
        1.0,
        "{c}"
    );
    let local = locals[0].to_string();
    assert!(
        must(
            &c,
            &format!(
                "tunnel_client_tunnel_bytes_total{{device=\"cam\",service=\"echo\",local=\"{local}\",direction=\"up\"}}"
            )
        ) >= (2 * LEN) as f64
    );
    assert!(
        must(
            &c,
            "tunnel_client_stream_resets_total{code=\"no_such_service\",by=\"device\"}"
        ) >= 1.0
    );
    assert_eq!(
        must(&c, "tunnel_client_connects_total{device=\"cam\"}"),
        1.0
    );

    // A wrong token is refused at the relay, by code.
    let thief = world.client("thief");
    thief.pin_relayed(
        "cam",
        &device,
        &device_id,
        (&relay.addr.to_string(), &relay.fingerprint),
        &[],
        Some("not-the-token"),
    );
    let out = thief.cmd(&["services", "cam"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refused the token"),
        "{}",
        stderr(&out)
    );
    let r = scrape(relay_metrics);
    assert!(must(&r, "tunnel_relay_refusals_total{code=\"token_rejected\"}") >= 1.0);

    // Values move with traffic.
    echo(locals[0], LEN);
    let d2 = scrape(dev_metrics);
    assert_eq!(
        must(
            &d2,
            "tunnel_device_tunnels_total{service=\"echo\",user=\"alice\"}"
        ),
        3.0
    );

    // Every series the shipped Grafana dashboard queries exists.
    let all = format!("{d2}{r}{}", scrape(client_metrics));
    let dashboard = include_str!("../../../examples/monitoring/grafana-dashboard.json");
    for name in series_names(dashboard) {
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            all.contains(&format!("# TYPE {name} ")) || all.contains(&format!("# TYPE {base} ")),
            "the dashboard queries {name}, which no binary exports"
        );
    }

    // No secret and no key in any label.
    for text in [&d2, &r, &scrape(client_metrics)] {
        assert!(!text.contains(&token), "a token in the metrics");
        assert!(
            !text.contains(&client.fingerprint()[..16]),
            "a fingerprint in the metrics"
        );
        assert!(
            !text.contains(&device.fingerprint[..16]),
            "a fingerprint in the metrics"
        );
    }
    open.signal("TERM");
    assert!(open.wait_exit(tunnel_testkit::SOON).success());
}

/// The `tunnel_…` metric names in a text.
fn series_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .match_indices("tunnel_")
        // At the start of a name, not inside one (`tunnel_device_tunnel_bytes…`).
        .filter(|(i, _)| {
            !text[..*i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .filter(|n: &String| n != "tunnel_")
        .collect();
    names.sort();
    names.dedup();
    names
}
