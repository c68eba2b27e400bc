//! A flood through the relay by token holders (issue 18): N users, each with its own token and
//! four channels of throw-away keys, pour ClientHello-only Initials into the device while its
//! owner connects, directly and through the relay; then the users are removed and their
//! channels must close.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tunnel_shared::identity::Fingerprint;
use tunnel_shared::relay::{RelayCode, RelayEvent};
use tunnel_shared::secret::Secret;
use tunnel_testkit::RelayLab;
use tunnel_testkit::hostile::{self, RelayLeg};

use crate::report::{Section, secs};
use crate::{Mode, poll};

/// Channels each token holder opens.
const CHANNELS_PER_HOLDER: usize = 4;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// The owner's connects: (direct ok, direct median, relayed ok, relayed median) of `n` each.
fn owner_connects(
    client: &tunnel_testkit::ClientFixture,
    n: usize,
) -> (usize, Duration, usize, Duration) {
    let mut out = (0, Vec::new(), 0, Vec::new());
    for _ in 0..n {
        for (device, ok, times) in [
            ("direct", &mut out.0, &mut out.1),
            ("cam", &mut out.2, &mut out.3),
        ] {
            let t0 = Instant::now();
            if client.cmd(&["services", device]).status.success() {
                *ok += 1;
                times.push(t0.elapsed());
            }
        }
    }
    (out.0, median(out.1), out.2, median(out.3))
}

pub(crate) fn relayed_flood(mode: &Mode) -> Section {
    let mut s = Section::new(
        "Flood through the relay by token holders",
        "while N token holders (Guests, 4 channels each) pour ClientHello-only Initials through \
         the relay, the owner connects every time, directly and relayed; removing the holders \
         closes all their channels within 2 s",
        &[
            "token holders",
            "Initials sent/s",
            "owner direct (ok, median s)",
            "owner relayed (ok, median s)",
            "channels closed after removal (s)",
        ],
    );
    let lab = RelayLab::new(&[], "");
    let RelayLab {
        world,
        relay,
        dev,
        device,
        client,
        device_id,
        ..
    } = &lab;
    client.pin("direct", device);
    let relay_fp: Fingerprint = relay.fingerprint.parse().expect("fingerprint");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let rounds: &[usize] = if mode.quick {
        &[0, 1, 4]
    } else {
        &[0, 1, 4, 16]
    };
    let tries = if mode.quick { 3 } else { 5 };
    let mut worst = Duration::ZERO;
    for &holders in rounds {
        let names: Vec<String> = (0..holders)
            .map(|i| format!("guest{holders}-{i}"))
            .collect();
        let mut tokens = Vec::new();
        for name in &names {
            let key = world.client(name);
            dev.add_user(name, &key.fingerprint(), "Guest");
            tokens.push(Secret::new(dev.token(name)));
        }
        // The relay has the new tokens once a channel with the last one opens.
        let legs: Vec<RelayLeg> = rt.block_on(async {
            let mut legs = Vec::new();
            for token in &tokens {
                for _ in 0..CHANNELS_PER_HOLDER {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    loop {
                        let (leg, answer) = hostile::relay_leg(
                            "127.0.0.2",
                            relay.addr,
                            relay_fp,
                            hostile::connect_hello(device_id, Some(token)),
                        )
                        .await;
                        if matches!(answer, Some(RelayEvent::Connected { .. })) {
                            legs.push(leg);
                            break;
                        }
                        assert!(Instant::now() < deadline, "a token holder got no channel");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            legs
        });
        let legs = Arc::new(legs);
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let flood = {
            let (legs, stop, sent, target) =
                (legs.clone(), stop.clone(), sent.clone(), device.addr);
            rt.spawn(async move {
                while !stop.load(Ordering::Relaxed) && !legs.is_empty() {
                    let packets = hostile::initial_packets(target, 5 * legs.len());
                    for (leg, chunk) in legs.iter().zip(packets.chunks(5)) {
                        sent.fetch_add(
                            hostile::flood_channel(leg, chunk) as u64,
                            Ordering::Relaxed,
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        let (d_ok, d_t, r_ok, r_t) = owner_connects(client, tries);
        let rate = sent.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
        s.check(
            d_ok == tries && r_ok == tries,
            format!("with {holders} token holders the owner connected {d_ok}/{tries} directly and {r_ok}/{tries} relayed"),
        );
        let closed = if holders == 0 {
            "-".to_string()
        } else {
            for name in &names {
                dev.ok(&["user", "remove", name]);
            }
            let t = Instant::now();
            let all = poll(Duration::from_secs(10), || {
                legs.iter()
                    .all(|l| l.conn.close_reason().is_some())
                    .then_some(())
            });
            let took = t.elapsed();
            s.check(
                all.is_some(),
                format!("the channels of {holders} removed holders stayed open"),
            );
            s.check(
                legs.iter()
                    .all(|l| hostile::refusal(l, None) == Some(RelayCode::TOKEN_REJECTED)),
                "a removed holder's channel closed with another code than TOKEN_REJECTED",
            );
            s.check(
                took < Duration::from_secs(2),
                format!("closing took {took:?}"),
            );
            secs(took)
        };
        stop.store(true, Ordering::Relaxed);
        let _ = rt.block_on(flood);
        worst = worst.max(d_t).max(r_t);
        s.row(vec![
            holders.to_string(),
            format!("{rate:.0}"),
            format!("{d_ok}/{tries}, {}", secs(d_t)),
            format!("{r_ok}/{tries}, {}", secs(r_t)),
            closed,
        ]);
    }
    s.headline = format!(
        "owner connected every time with up to {} token holders flooding; slowest median {} s",
        rounds.last().copied().unwrap_or(0),
        secs(worst)
    );
    s.note(
        "Each holder: 4 channels from 127.0.0.2, each sending 5 fresh ClientHello-only Initials \
         every 100 ms through the relay; the relay lets a channel send 32 handshake packets, \
         then 1 a second; the device counts relayed handshakes per credential, a quarter of its \
         slots kept for owners. \"channels closed\" is from the last holder's `user remove` to \
         the last channel closed (the device reloads state.json every 0.5 s).",
    );
    s
}
