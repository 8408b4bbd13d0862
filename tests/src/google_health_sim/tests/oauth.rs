//! OAuth: code flow with PKCE and granular consent, refresh, identity.

use super::*;

fn auth_params<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut p = vec![
        ("client_id", "web"),
        ("redirect_uri", REDIRECT),
        ("response_type", "code"),
        ("state", "st-1"),
        ("user", UID),
    ];
    p.extend_from_slice(extra);
    p
}

#[tokio::test]
async fn pkce_code_flow_granular_consent_and_scope_errors() {
    let sim = start(SimConfig::default()).await;
    sim.sim(
        "/_sim/apps",
        json!({ "client_id": "web", "client_secret": "s3" }),
    )
    .await;
    sim.sim("/_sim/users", json!({ "healthUserId": UID })).await;
    let both = format!("{ACTIVITY} {METRICS}");
    let pkce = [
        ("scope", both.as_str()),
        ("grant", ACTIVITY),
        ("access_type", "offline"),
        ("code_challenge", CHALLENGE),
        ("code_challenge_method", "S256"),
    ];

    // Granular consent: only the activity scope is ticked.
    let q = sim.authorize(&auth_params(&pkce)).await;
    assert_eq!(q["state"], "st-1");
    assert_eq!(q["scope"], ACTIVITY);
    assert!(q["code"].starts_with("4/0A"));

    // Wrong verifier: invalid_grant, and the code is spent.
    let (status, err) = sim
        .exchange(
            &q["code"],
            Some("not-the-verifier-but-long-enough-to-pass-43-chars"),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        err,
        json!({ "error": "invalid_grant", "error_description": "Invalid code verifier." })
    );
    let (status, err) = sim.exchange(&q["code"], Some(VERIFIER)).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (400, Some("invalid_grant"))
    );

    // Missing verifier.
    let q = sim.authorize(&auth_params(&pkce)).await;
    let (status, err) = sim
        .token(
            &[
                ("grant_type", "authorization_code"),
                ("code", &q["code"]),
                ("redirect_uri", REDIRECT),
                ("client_id", "web"),
                ("client_secret", "s3"),
            ],
            None,
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(err["error_description"], "Missing code verifier.");

    // Right verifier, HTTP Basic client authentication.
    let q = sim.authorize(&auth_params(&pkce)).await;
    let (status, tokens) = sim
        .token(
            &[
                ("grant_type", "authorization_code"),
                ("code", &q["code"]),
                ("redirect_uri", REDIRECT),
                ("code_verifier", VERIFIER),
            ],
            Some(&basic("web", "s3")),
        )
        .await;
    assert_eq!(status, 200, "{tokens}");
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 3599);
    assert_eq!(tokens["scope"], ACTIVITY);
    assert!(
        tokens["access_token"]
            .as_str()
            .unwrap()
            .starts_with("ya29.")
    );
    assert!(
        tokens["refresh_token"]
            .as_str()
            .unwrap()
            .starts_with("1//0")
    );
    assert!(tokens.get("refresh_token_expires_in").is_none());
    let access = tokens["access_token"].as_str().unwrap();

    // The granted scope covers steps, not heart rate.
    let (status, _) = sim.list(access, "steps", &[]).await;
    assert_eq!(status, 200);
    let (status, err) = sim.list(access, "heart-rate", &[]).await;
    assert_eq!(status, 403);
    assert_eq!(err["error"]["code"], 403);
    assert_eq!(err["error"]["status"], "PERMISSION_DENIED");
    assert_eq!(
        err["error"]["details"][0],
        json!({
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "MISSING_OAUTH_SCOPE",
            "domain": "health.googleapis.com",
            "metadata": { "dataType": "heart-rate" },
        })
    );

    // Consent already given: no new refresh token unless prompt=consent.
    let plain = [("scope", ACTIVITY), ("access_type", "offline")];
    let q = sim.authorize(&auth_params(&plain)).await;
    let (status, again) = sim.exchange(&q["code"], None).await;
    assert_eq!(status, 200);
    assert!(again.get("refresh_token").is_none(), "{again}");
    let forced = [
        ("scope", ACTIVITY),
        ("access_type", "offline"),
        ("prompt", "consent"),
    ];
    let q = sim.authorize(&auth_params(&forced)).await;
    let (_, again) = sim.exchange(&q["code"], None).await;
    assert!(again.get("refresh_token").is_some(), "{again}");
    // include_granted_scopes adds what was granted before.
    let incr = [("scope", METRICS), ("include_granted_scopes", "true")];
    let q = sim.authorize(&auth_params(&incr)).await;
    assert_eq!(q["scope"], format!("{METRICS} {ACTIVITY}"));

    // Client errors.
    let q = sim.authorize(&auth_params(&plain)).await;
    let (status, err) = sim
        .token(
            &[
                ("grant_type", "authorization_code"),
                ("code", &q["code"]),
                ("redirect_uri", REDIRECT),
                ("client_id", "web"),
                ("client_secret", "wrong"),
            ],
            None,
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(err["error"], "invalid_client");
    let resp = sim
        .http
        .get(format!("{}/o/oauth2/v2/auth", sim.base))
        .query(&auth_params(&[
            ("scope", ACTIVITY),
            ("code_challenge", CHALLENGE),
            ("code_challenge_method", "plain"),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let q = sim
        .authorize(&[
            ("client_id", "web"),
            ("redirect_uri", REDIRECT),
            ("response_type", "code"),
            ("scope", ACTIVITY),
            ("user", "nobody"),
        ])
        .await;
    assert_eq!(q["error"], "access_denied");

    // A token with no data scope at all fails at the front end; cloud-platform is refused.
    let profile_only = sim.user("u-profile", Some(vec![PROFILE])).await;
    let (status, err) = sim.list(&profile_only, "steps", &[]).await;
    assert_eq!(
        (status, reason(&err)),
        (403, "ACCESS_TOKEN_SCOPE_INSUFFICIENT")
    );
    assert_eq!(err["error"]["details"][0]["domain"], "googleapis.com");
    let mixed = sim
        .user(
            "u-mixed",
            Some(vec!["activity_and_fitness.readonly", "cloud-platform"]),
        )
        .await;
    let (status, err) = sim.list(&mixed, "steps", &[]).await;
    assert_eq!((status, reason(&err)), (403, "DISALLOWED_OAUTH_SCOPES"));

    // Only successful exchanges count.
    assert_eq!(sim.stats().await["users"][UID]["code_exchanges"], 3);
}

#[tokio::test]
async fn refresh_is_not_rotated_and_testing_tokens_die_after_seven_days() {
    let sim = start(SimConfig::default()).await;
    sim.sim(
        "/_sim/apps",
        json!({ "client_id": "web", "client_secret": "s3", "testing": true }),
    )
    .await;
    sim.sim(
        "/_sim/apps",
        json!({ "client_id": "prod", "client_secret": "p", "testing": false }),
    )
    .await;
    sim.sim("/_sim/users", json!({ "healthUserId": UID })).await;
    let code_flow = |client: &'static str, secret: &'static str| {
        let sim = &sim;
        async move {
            let q = sim
                .authorize(&[
                    ("client_id", client),
                    ("redirect_uri", REDIRECT),
                    ("response_type", "code"),
                    ("scope", ACTIVITY),
                    ("access_type", "offline"),
                    ("user", UID),
                ])
                .await;
            let (status, tokens) = sim
                .token(
                    &[
                        ("grant_type", "authorization_code"),
                        ("code", &q["code"]),
                        ("redirect_uri", REDIRECT),
                        ("client_id", client),
                        ("client_secret", secret),
                    ],
                    None,
                )
                .await;
            assert_eq!(status, 200, "{tokens}");
            tokens
        }
    };
    let testing = code_flow("web", "s3").await;
    assert_eq!(testing["refresh_token_expires_in"], 604_799);
    let prod = code_flow("prod", "p").await;
    assert!(prod.get("refresh_token_expires_in").is_none());
    let refresh = |client: &'static str, secret: &'static str, token: String| {
        let sim = &sim;
        async move {
            sim.token(
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", &token),
                    ("client_id", client),
                    ("client_secret", secret),
                ],
                None,
            )
            .await
        }
    };
    let rt = testing["refresh_token"].as_str().unwrap().to_owned();

    // No rotation: the same refresh token works again and again.
    for _ in 0..2 {
        let (status, r) = refresh("web", "s3", rt.clone()).await;
        assert_eq!(status, 200, "{r}");
        assert!(r.get("refresh_token").is_none());
        assert_eq!(r["expires_in"], 3599);
        assert_eq!(r["scope"], ACTIVITY);
        assert_ne!(r["access_token"], testing["access_token"]);
    }
    // Another client cannot use it.
    let (status, r) = refresh("prod", "p", rt.clone()).await;
    assert_eq!(
        (status, r["error"].as_str()),
        (400, Some("unauthorized_client"))
    );

    // The access token dies after an hour.
    let access = testing["access_token"].as_str().unwrap();
    sim.sim("/_sim/clock/advance", json!({ "seconds": 3_600 }))
        .await;
    let (status, err) = sim.list(access, "steps", &[]).await;
    assert_eq!((status, reason(&err)), (401, "ACCESS_TOKEN_EXPIRED"));

    // Six days on it still refreshes; past seven days it is expired.
    sim.sim(
        "/_sim/clock/advance",
        json!({ "seconds": 6 * 86_400 - 3_600 }),
    )
    .await;
    let (status, r) = refresh("web", "s3", rt.clone()).await;
    assert_eq!(status, 200, "{r}");
    let left = r["refresh_token_expires_in"].as_i64().unwrap();
    assert!((86_390..=86_399).contains(&left), "{left}");
    sim.sim("/_sim/clock/advance", json!({ "seconds": 86_400 }))
        .await;
    let (status, r) = refresh("web", "s3", rt).await;
    assert_eq!(status, 400);
    assert_eq!(
        r,
        json!({ "error": "invalid_grant", "error_description": "Token has been expired or revoked." })
    );
    // The production client's refresh token does not expire.
    let (status, _) = refresh(
        "prod",
        "p",
        prod["refresh_token"].as_str().unwrap().to_owned(),
    )
    .await;
    assert_eq!(status, 200);

    // Revocation kills the grant: refresh and its access tokens.
    let resp = sim
        .http
        .post(format!("{}/revoke", sim.base))
        .form(&[("token", prod["refresh_token"].as_str().unwrap())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let (status, r) = refresh(
        "prod",
        "p",
        prod["refresh_token"].as_str().unwrap().to_owned(),
    )
    .await;
    assert_eq!(
        (status, r["error_description"].as_str()),
        (400, Some(EXPIRED_OR_REVOKED))
    );
    let stats = sim.stats().await;
    assert_eq!(stats["users"][UID]["refreshes"], 4);
    assert_eq!(stats["users"][UID]["code_exchanges"], 2);
}

#[tokio::test]
async fn identity_and_unlinked_accounts() {
    let sim = start(SimConfig::default()).await;
    let token = sim.user(UID, None).await;
    let (status, _, v) = sim.get("/v4/users/me/identity", Some(&token), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        v,
        json!({ "name": "users/me/identity", "healthUserId": UID, "legacyUserId": "26FWFL" })
    );
    // Own numeric id accepted for identity; another id is refused.
    let (status, _, _) = sim
        .get(&format!("/v4/users/{UID}/identity"), Some(&token), &[])
        .await;
    assert_eq!(status, 200);
    let (status, _, v) = sim.get("/v4/users/123/identity", Some(&token), &[]).await;
    assert_eq!(
        (status, v["error"]["status"].as_str()),
        (403, Some("PERMISSION_DENIED"))
    );

    let v = sim
        .sim(
            "/_sim/users",
            json!({ "healthUserId": "u-new", "client_id": "app", "client_secret": "secret" }),
        )
        .await;
    let (_, _, identity) = sim
        .get("/v4/users/me/identity", v["access_token"].as_str(), &[])
        .await;
    assert_eq!(
        identity,
        json!({ "name": "users/me/identity", "healthUserId": "u-new" })
    );

    let v = sim
        .sim(
            "/_sim/users",
            json!({ "healthUserId": "u-nolink", "linked": false,
                    "client_id": "app", "client_secret": "secret" }),
        )
        .await;
    let token = v["access_token"].as_str().unwrap();
    for path in [
        "/v4/users/me/identity",
        "/v4/users/me/dataTypes/steps/dataPoints",
    ] {
        let (status, _, err) = sim.get(path, Some(token), &[]).await;
        assert_eq!(status, 400, "{path}");
        assert_eq!(
            err,
            json!({ "error": {
                "code": 400,
                "message": "The Google account is not linked to a Fitbit account.",
                "status": "FAILED_PRECONDITION",
                "details": [{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "ACCOUNT_NOT_LINKED",
                    "domain": "health.googleapis.com",
                }],
            }})
        );
    }
}
