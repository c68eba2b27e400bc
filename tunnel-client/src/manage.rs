//! User and pairing management over the control channel (`tunnel-client user|pairing|device
//! rename`). Each request is authorized by the device; an error names what was refused.

use std::io::IsTerminal;

use tunnel_shared::client::{
    ClientError, ClientHome, ConnectOptions, Dialer, KnownDevice, Session, connect_paired,
};
use tunnel_shared::pairing::{PairingMode, PairingString};

use crate::{PairingCmd, UserCmd};

/// Runs `f` on an authenticated session with `device`, then closes it.
async fn with_session<T>(
    home: &ClientHome,
    device: &str,
    f: impl AsyncFnOnce(&Session, &KnownDevice) -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    let identity = home.identity()?;
    let dev = home.find_device(device)?;
    let opts = ConnectOptions::default();
    let dialer = Dialer::new(&opts.transport)?;
    let session = connect_paired(home, &dialer, &identity, &dev, &opts).await?;
    let out = f(&session, &dev).await;
    session.close();
    drop(session);
    dialer.close().await;
    out
}

/// Prints a pairing string, and its QR code when stdout is a terminal.
fn print_pairing(ps: &PairingString) {
    print!("{}", ps.to_terminal(std::io::stdout().is_terminal()));
}

pub(crate) async fn user(home: &ClientHome, device: &str, cmd: UserCmd) -> Result<(), ClientError> {
    with_session(home, device, async |s, dev| match cmd {
        UserCmd::List { json } => {
            let users = s.users().await?;
            if json {
                let v: Vec<_> = users
                    .iter()
                    .map(|u| {
                        serde_json::json!({
                            "username": u.username, "role": u.role, "display_name": u.display_name,
                            "invited": u.invited,
                            "fingerprints": u.fingerprints.iter().map(|(f, n)| serde_json::json!({
                                "fingerprint": f.to_string(), "name": n,
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!("{:<16} {:<9} {:<6} KEYS", "USER", "ROLE", "STATE");
                for u in users {
                    let keys: Vec<String> =
                        u.fingerprints.iter().map(|(f, _)| f.fmt_short()).collect();
                    let state = if u.invited { "invited" } else { "paired" };
                    let me = if s.welcome.user.as_deref() == Some(u.username.as_str()) {
                        "  (you)"
                    } else {
                        ""
                    };
                    println!(
                        "{:<16} {:<9} {state:<6} {}{me}",
                        u.username,
                        u.role,
                        keys.join(" ")
                    );
                }
            }
            Ok(())
        }
        UserCmd::Remove { username } => {
            s.remove_user(&username).await?;
            println!("Removed user '{username}' from '{}'", dev.name);
            Ok(())
        }
        UserCmd::SetRole { username, role } => {
            s.set_role(&username, &role).await?;
            println!("User '{username}' on '{}' now has role {role}", dev.name);
            Ok(())
        }
        UserCmd::RotateToken { username } => {
            let own = s.require_user()?.to_string();
            let username = username.unwrap_or_else(|| own.clone());
            let token = s.rotate_token(&username).await?;
            if username == own {
                home.update_known(|known| {
                    if let Some(d) = known.devices.iter_mut().find(|d| d.name == dev.name) {
                        d.sct = Some(token.clone());
                    }
                    Ok(())
                })?;
                println!(
                    "Replaced your server-connect token on '{}' and saved the new one; the old \
                     one no longer works.",
                    dev.name
                );
            } else {
                println!(
                    "Replaced the server-connect token of '{username}' on '{}'; their remote \
                     connections with the old one are closed. Give them the new token (they add \
                     it with `tunnel-client device add … --sct -`, or get it on their next local \
                     connection):\n  {}",
                    dev.name,
                    token.expose()
                );
            }
            Ok(())
        }
        UserCmd::Invite { username, role } => {
            let invite = s.invite_user(&username, role.as_deref()).await?;
            println!(
                "Invited '{}' (role {}) on '{}'.",
                invite.username, invite.role, dev.name
            );
            if !invite.mode_enabled {
                println!(
                    "Note: password invite pairing is off on the device; switch it on with \
                     `tunnel-client pairing {} enable password-invite`.",
                    dev.name
                );
            }
            print_pairing(&PairingString {
                device_id: s.welcome.device_id.clone(),
                fingerprint: dev.fingerprint,
                addresses: dev.addresses.clone(),
                username: Some(invite.username),
                password: invite.password,
                sct: Some(invite.sct),
                relays: dev.relays.clone(),
            });
            Ok(())
        }
    })
    .await
}

pub(crate) async fn pairing(
    home: &ClientHome,
    device: &str,
    cmd: PairingCmd,
) -> Result<(), ClientError> {
    with_session(home, device, async |s, dev| match cmd {
        PairingCmd::Status => {
            let settings = s.settings().await?;
            for mode in PairingMode::ALL {
                println!(
                    "{:<16} {}",
                    mode.as_str(),
                    if settings.enabled.contains(&mode) {
                        "on"
                    } else {
                        "off"
                    }
                );
            }
            println!("open pairing role: {}", settings.open_pairing_role);
            if settings.enabled.contains(&PairingMode::PasswordOpen) {
                println!();
                println!(
                    "Password open pairing string (anyone holding it can become a {}):",
                    settings.open_pairing_role
                );
                print_pairing(&PairingString {
                    device_id: s.welcome.device_id.clone(),
                    fingerprint: dev.fingerprint,
                    addresses: dev.addresses.clone(),
                    username: None,
                    password: settings.open_password,
                    sct: Some(settings.open_sct),
                    relays: dev.relays.clone(),
                });
            }
            Ok(())
        }
        PairingCmd::Enable { mode } | PairingCmd::Disable { mode } => {
            let enabled = matches!(cmd, PairingCmd::Enable { .. });
            s.set_pairing_mode(mode, enabled).await?;
            println!(
                "{mode} pairing on '{}' is {}",
                dev.name,
                if enabled { "on" } else { "off" }
            );
            Ok(())
        }
    })
    .await
}

pub(crate) async fn rename(
    home: &ClientHome,
    device: &str,
    name: String,
) -> Result<(), ClientError> {
    with_session(home, device, async |s, dev| {
        s.rename_device(&name).await?;
        println!("Renamed '{}' to \"{name}\" on the device", dev.name);
        Ok(())
    })
    .await
}
