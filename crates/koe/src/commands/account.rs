//! `koe signup | login | whoami | logout | passwd | delete-account`: this device's account.

use std::io::Write;

use anyhow::{bail, Context, Result};
use koe_auth::LoginClient;
use koe_types::{Certificate, Role, UnixTime};

use super::PasswordSource;
use crate::cli::{DeleteAccountArgs, LoginArgs, PasswdArgs, SignupArgs, WhoamiArgs};
use crate::duration::human;
use crate::profile::{CertificateStatus, Profile};

pub async fn signup(profile: &Profile, args: SignupArgs) -> Result<()> {
    let network = profile.resolve_network(args.network.network.as_deref())?;
    let username = koe_types::Username::parse(&args.username)
        .with_context(|| format!("cannot sign up as {:?}", args.username))?;
    let password = PasswordSource::new(args.password.password_stdin)
        .read_new(&format!("New password for {username}: "))?;
    let client = LoginClient::new(network);
    client
        .signup(username.as_str(), &password)
        .await
        .with_context(|| format!("sign-up of {username} failed"))?;
    println!("Signed up as {username} on network {:?}.", client.network().name.as_str());
    let device_key = profile.device_key()?;
    let certificate = client
        .login(username.as_str(), &password, &device_key.public_key(), None)
        .await
        .context("signed up, but the first login failed; run `koe login` to retry")?;
    profile.save_certificate(&certificate)?;
    print_logged_in(&certificate);
    Ok(())
}

pub async fn login(profile: &Profile, args: LoginArgs) -> Result<()> {
    let network = profile.resolve_network(args.network.network.as_deref())?;
    let password = PasswordSource::new(args.password.password_stdin)
        .read(&format!("Password for {}: ", args.username))?;
    let device_key = profile.device_key()?;
    let certificate = LoginClient::new(network)
        .login(&args.username, &password, &device_key.public_key(), args.lifetime)
        .await
        .with_context(|| format!("login as {} failed", args.username))?;
    profile.save_certificate(&certificate)?;
    print_logged_in(&certificate);
    Ok(())
}

fn print_logged_in(certificate: &Certificate) {
    let body = certificate.body();
    let role = match body.role {
        Role::User => String::new(),
        role => format!(" (role: {role})"),
    };
    println!(
        "Logged in as {}{role} on network {:?}: certificate valid until {} ({} from now).",
        body.username,
        body.network.as_str(),
        body.not_after,
        human(UnixTime::now().until(body.not_after))
    );
}

pub async fn whoami(profile: &Profile, args: WhoamiArgs) -> Result<()> {
    let network = profile.network()?;
    let (certificate, note) = match profile.fresh_certificate(args.offline).await? {
        CertificateStatus::NotLoggedIn => bail!("not logged in: run `koe login USER`"),
        CertificateStatus::Expired(certificate) => bail!(
            "the certificate of {} expired at {}: run `koe login {}`",
            certificate.username(),
            certificate.not_after(),
            certificate.username()
        ),
        CertificateStatus::Valid(certificate) => (certificate, None),
        CertificateStatus::Renewed(certificate) => {
            (certificate, Some("renewed just now".to_string()))
        }
        CertificateStatus::RenewalFailed(certificate, reason) => {
            (certificate, Some(format!("renewal failed, will retry: {reason}")))
        }
    };
    let body = certificate.body();
    let now = UnixTime::now();
    let check = match &network {
        Some(network) => match certificate.verify(&network.name, &network.signing_key, now) {
            Ok(()) => "valid, signed by the network's key".to_string(),
            Err(error) => format!("NOT VALID: {error}"),
        },
        None => "cannot check: the profile has no network file".to_string(),
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "username:     {}", body.username)?;
    if body.role != Role::User {
        writeln!(out, "role:         {}", body.role)?;
    }
    writeln!(out, "network:      {}", body.network)?;
    writeln!(out, "device key:   {}", body.device_key.fingerprint())?;
    writeln!(
        out,
        "certificate:  {check}; serial {}\n              from {} until {} ({} left)",
        body.serial,
        body.not_before,
        body.not_after,
        human(now.until(body.not_after))
    )?;
    if let Some(note) = note {
        writeln!(out, "              {note}")?;
    }
    writeln!(out, "profile:      {}", profile.home().display())?;
    Ok(())
}

/// Forgets the certificate and stops the running client, which would otherwise stay online
/// as the user who just logged out.
pub async fn logout(profile: &Profile) -> Result<()> {
    let forgot = profile.forget_certificate()?;
    let request = crate::daemon::api::Request::Shutdown;
    if crate::daemon::control::ask(profile.home(), &request).await.is_ok() {
        if super::client::stopped(profile.home(), std::time::Duration::from_secs(15)).await {
            println!("Stopped the running client.");
        } else {
            println!("Asked the running client to stop; it is still going (koe down).");
        }
    }
    if forgot {
        println!(
            "Logged out. The device key stays in {}; `koe login USER` logs in again.",
            profile.home().display()
        );
    } else {
        println!("Not logged in.");
    }
    Ok(())
}

/// The username of this profile's certificate, even an expired one.
fn logged_in_username(profile: &Profile) -> Result<String> {
    match profile.certificate()? {
        Some(certificate) => Ok(certificate.username().to_string()),
        None => bail!("not logged in: run `koe login USER` first"),
    }
}

pub async fn change_password(profile: &Profile, args: PasswdArgs) -> Result<()> {
    let username = logged_in_username(profile)?;
    let network = profile.resolve_network(None)?;
    let passwords = PasswordSource::new(args.password_stdin);
    let current = passwords.read(&format!("Current password for {username}: "))?;
    let new = passwords.read_new("New password: ")?;
    let client = LoginClient::new(network);
    client
        .change_password(&username, &current, &new)
        .await
        .context("password change failed")?;
    println!("Password changed. Certificates issued before will not renew.");
    // This device's own certificate was revoked for renewal with the others: get a new one.
    let device_key = profile.device_key()?;
    let certificate = client
        .login(&username, &new, &device_key.public_key(), None)
        .await
        .context("password changed, but logging in again failed; run `koe login`")?;
    profile.save_certificate(&certificate)?;
    print_logged_in(&certificate);
    Ok(())
}

pub async fn delete_account(profile: &Profile, args: DeleteAccountArgs) -> Result<()> {
    let username = logged_in_username(profile)?;
    let network = profile.resolve_network(None)?;
    if !args.yes {
        print!("Delete the account {username} for good? Type its name to confirm: ");
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != username {
            bail!("not confirmed; nothing was deleted");
        }
    }
    let password = PasswordSource::new(args.password.password_stdin)
        .read(&format!("Password for {username}: "))?;
    LoginClient::new(network)
        .delete_account(&username, &password)
        .await
        .context("account deletion failed")?;
    profile.forget_certificate()?;
    println!("Account {username} deleted.");
    Ok(())
}
