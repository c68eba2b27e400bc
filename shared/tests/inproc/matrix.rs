//! The permission matrix, as OpenSSH's `forward-control.sh`: every role × every action × local
//! and remote × two services, each cell with its expected outcome, sent as real requests (and
//! real tunnel streams) over QUIC. Denied calls must leave `state.json` byte-identical.
//!
//! Parameters are chosen so that authorized calls change nothing either (they target a missing
//! user, an existing name, an invalid name…): the table is then independent of its order, and
//! "authorized" means the device got past access control (the answer is not `forbidden`,
//! `already paired` or `pairing disabled`).

use tunnel_shared::iam::Action;
use tunnel_shared::identity::SecretKey;
use tunnel_shared::pairing::PairingMode;
use tunnel_shared::proto::{ErrorCode, Request, Response};

use tunnel_testkit::inproc::{
    LOCAL, REMOTE, TestClient, TestDevice, add_user, echo_server, tunnel,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Unpaired,
    Removed,
    Guest,
    Standard,
    Owner,
}

/// Expected: `true` = authorized. Columns follow `Action::ALL`.
fn expected(who: Who, local: bool, action: Action) -> bool {
    use Action::*;
    let paired = matches!(who, Who::Guest | Who::Standard | Who::Owner);
    match action {
        PairingGet => true,
        PairingLocalInitial | PairingLocalOpen => !paired && local,
        PairingPasswordInvite | PairingPasswordOpen => !paired,
        TunnelListServices | TunnelGetService | TunnelConnect => match who {
            Who::Owner | Who::Standard => true,
            Who::Guest => local,
            Who::Unpaired | Who::Removed => false,
        },
        IamListRoles => paired,
        IamListUsers
        | IamGetUser
        | IamCreateUser
        | IamDeleteUser
        | IamSetUserRole
        | IamSetUserDisplayName
        | IamAddFingerprint
        | IamRemoveFingerprint
        | IamGetSettings
        | IamSetSettings
        | IamRotateToken
        | DeviceSetName => who == Who::Owner,
    }
}

fn denied(r: &Response) -> bool {
    matches!(
        r,
        Response::Error(e) if matches!(
            e.code,
            ErrorCode::FORBIDDEN | ErrorCode::ALREADY_PAIRED | ErrorCode::PAIRING_DISABLED
        )
    )
}

/// The request that exercises `action` without changing anything when authorized.
fn request(action: Action, service: &str) -> Request {
    use Action::*;
    let other = SecretKey::generate().fingerprint();
    match action {
        PairingGet => Request::PairingGet,
        // An invalid name: authorized requests stop at validation.
        PairingLocalInitial => Request::PairLocalInitial {
            username: Some("not a name!".into()),
            key_name: None,
        },
        PairingLocalOpen => Request::PairLocalOpen {
            username: "not a name!".into(),
            key_name: None,
        },
        // The first PAKE message changes nothing.
        PairingPasswordInvite => Request::PakeStart {
            username: "victim".into(),
            msg: vec![0u8; 33],
        },
        PairingPasswordOpen => Request::PakeStart {
            username: String::new(),
            msg: vec![0u8; 33],
        },
        TunnelListServices => Request::ListServices,
        TunnelGetService => Request::GetService { id: service.into() },
        TunnelConnect => unreachable!("tested with a stream"),
        IamListUsers => Request::ListUsers,
        IamGetUser => Request::GetUser {
            username: "victim".into(),
        },
        // Exists already: a conflict after authorization.
        IamCreateUser => Request::CreateUser {
            username: "victim".into(),
            role: Some("Guest".into()),
        },
        IamDeleteUser => Request::DeleteUser {
            username: "nosuch".into(),
        },
        IamSetUserRole => Request::SetUserRole {
            username: "nosuch".into(),
            role: "Guest".into(),
        },
        IamSetUserDisplayName => Request::SetUserDisplayName {
            username: "nosuch".into(),
            display_name: Some("x".into()),
        },
        IamAddFingerprint => Request::AddFingerprint {
            username: "nosuch".into(),
            fingerprint: other,
            key_name: None,
        },
        IamRemoveFingerprint => Request::RemoveFingerprint {
            username: "nosuch".into(),
            fingerprint: other,
        },
        IamListRoles => Request::ListRoles,
        IamGetSettings => Request::GetSettings,
        // Sets the value it already has.
        IamSetSettings => Request::SetPairingMode {
            mode: PairingMode::LocalOpen,
            enabled: true,
        },
        DeviceSetName => Request::SetDeviceName {
            name: "Test".into(),
        },
        IamRotateToken => Request::RotateToken {
            username: "nosuch".into(),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_action_locality_and_service() {
    let echo = echo_server().await;
    let keys: Vec<(Who, SecretKey)> = [
        Who::Unpaired,
        Who::Removed,
        Who::Guest,
        Who::Standard,
        Who::Owner,
    ]
    .into_iter()
    .map(|w| (w, SecretKey::generate()))
    .collect();
    let fp = |w: Who| keys.iter().find(|(x, _)| *x == w).unwrap().1.fingerprint();
    let (g, s, o, r) = (
        fp(Who::Guest),
        fp(Who::Standard),
        fp(Who::Owner),
        fp(Who::Removed),
    );
    let dev = TestDevice::start(echo, move |st| {
        for m in PairingMode::ALL {
            st.pairing.set(m, true);
        }
        add_user(st, "guest", "Guest", g);
        add_user(st, "standard", "Standard", s);
        add_user(st, "owner", "Owner", o);
        add_user(st, "removed", "Standard", r);
        st.remove_user("removed").unwrap();
        st.invite_user("victim", "Guest").unwrap();
    })
    .await;
    let state = dev.state();
    let open_sct = state.pairing.open_sct.clone();

    let mut mismatches = Vec::new();
    let mut cells = 0;
    for (who, key) in &keys {
        for local in [true, false] {
            let client = TestClient::with_key(if local { LOCAL } else { REMOTE }, key.clone());
            let sct = match who {
                Who::Unpaired | Who::Removed => open_sct.clone(),
                _ => state
                    .user_by_fingerprint(&key.fingerprint())
                    .unwrap()
                    .sct
                    .clone(),
            };
            let session = client
                .connect(&dev, (!local).then_some(&sct))
                .await
                .unwrap_or_else(|e| panic!("{who:?} local={local}: {e}"));
            assert_eq!(session.welcome.local, local);
            for action in Action::ALL {
                for service in ["ssh", "cam"] {
                    cells += 1;
                    let before = dev.state_bytes();
                    let (authorized, shown) = if action == Action::TunnelConnect {
                        let r = tunnel(&session, service).await;
                        (r.is_ok(), format!("{r:?}"))
                    } else {
                        let r = session.request(&request(action, service)).await.unwrap();
                        (!denied(&r), format!("{r:?}"))
                    };
                    let want = expected(*who, local, action);
                    if authorized != want {
                        mismatches.push(format!(
                            "{who:?} {} {action} {service}: expected {}, got {shown}",
                            if local { "local" } else { "remote" },
                            if want { "allow" } else { "deny" }
                        ));
                    }
                    if !authorized {
                        assert_eq!(
                            dev.state_bytes(),
                            before,
                            "denied {action} changed state.json"
                        );
                    }
                }
            }
            session.close();
        }
    }
    assert_eq!(cells, 5 * 2 * Action::ALL.len() * 2);
    assert!(
        mismatches.is_empty(),
        "{} cells differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    dev.stop().await;
}

/// The list of services is filtered per service by `Tunnel:GetService`, and `Tunnel:Connect` is
/// decided per service type, with a custom policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_service_policy_filters_the_list_and_the_tunnels() {
    let echo = echo_server().await;
    let key = SecretKey::generate();
    let fp = key.fingerprint();
    // A role that may use rtsp services only.
    let iam = tunnel_shared::iam::DEFAULT_IAM_TOML.to_string()
        + r#"
[[policy]]
id = "RtspOnly"
[[policy.statement]]
effect = "allow"
actions = ["Tunnel:ListServices", "Tunnel:GetService", "Tunnel:Connect"]
[[policy.statement]]
effect = "deny"
actions = ["Tunnel:GetService", "Tunnel:Connect"]
conditions = [{ StringNotEquals = { "Tunnel:ServiceType" = ["rtsp"] } }]

[[role]]
id = "Viewer"
policies = ["RtspOnly"]
"#;
    let dev = TestDevice::start_with(
        echo,
        move |st| {
            add_user(st, "viewer", "Viewer", fp);
        },
        "",
        Some(&iam),
    )
    .await;
    let client = TestClient::with_key(LOCAL, key);
    let session = client.connect(&dev, None).await.unwrap();
    let ids: Vec<String> = session
        .services()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, ["cam"]);
    assert_eq!(tunnel(&session, "cam").await, Ok(()));
    assert_eq!(
        tunnel(&session, "ssh").await,
        Err(tunnel_shared::proto::StreamCode::FORBIDDEN)
    );
    // The deny tests the service type, which a missing service does not have: the deny does
    // not apply, the allow does, and the device answers that there is no such service.
    assert_eq!(
        tunnel(&session, "nosuch").await,
        Err(tunnel_shared::proto::StreamCode::NO_SUCH_SERVICE)
    );
    dev.stop().await;
}
