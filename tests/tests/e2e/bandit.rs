//! The bandit's two algorithms through the host, with the plugin built as a cdylib and loaded by
//! the real loader: UCB1 breaks ties at random, Thompson sampling keeps an exact Beta posterior
//! (the Bernoulli trick) and converges on the better arm.

use plugin_api::stats::chi_square_fit;
use serde_json::{Value, json};
use tests::PluginDir;

fn bandit(dir: &PluginDir, config: Value) -> plugin_host::PluginHost {
    dir.configure(&json!({"bandit": {"config": config}}));
    dir.add("bandit", "libbandit.so");
    let host = dir.host();
    let report = host.scan().unwrap();
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    host
}

fn choose(host: &plugin_host::PluginHost, arms: &[&str]) -> String {
    host.execute(
        "bandit",
        "choose",
        &json!({"context": "chat", "arms": arms}),
    )
    .and_then(|arm| arm.as_str().map(str::to_owned))
    .expect("the bandit chose no arm")
}

fn update(host: &plugin_host::PluginHost, arm: &str, reward: f64) {
    host.call_with::<_, ()>(
        "bandit",
        "update",
        &json!({"context": "chat", "arm": arm, "reward": reward}),
    )
    .expect("the update failed");
}

/// Counts of each arm over `n` choices, in the order of `arms`.
fn counts(host: &plugin_host::PluginHost, arms: &[&str], n: usize) -> Vec<u64> {
    let mut counts = vec![0u64; arms.len()];
    for _ in 0..n {
        let arm = choose(host, arms);
        let i = arms
            .iter()
            .position(|a| *a == arm)
            .expect("an arm not offered");
        counts[i] += 1;
    }
    counts
}

/// Unpulled arms are tried first, a random one of them; arms with equal bounds are chosen
/// evenly (a chi-square test of uniformity), not always the first listed. The old rule, "first
/// maximum wins", chose `a` every time and fails both checks.
#[test]
fn ucb1_breaks_ties_at_random_through_the_host() {
    let dir = PluginDir::new();
    let host = bandit(&dir, json!({"algorithm": "ucb1", "seed": 3}));
    let arms = ["a", "b", "c"];
    let unpulled = counts(&host, &arms, 3000);
    let p = chi_square_fit(&unpulled, &[1.0, 1.0, 1.0]).unwrap();
    assert!(
        p > 1e-4,
        "unpulled arms not chosen evenly: {unpulled:?}, p = {p}"
    );

    // The same history on every arm: equal upper bounds.
    for arm in arms {
        for reward in [0.2, 0.9, 0.5] {
            update(&host, arm, reward);
        }
    }
    let tied = counts(&host, &arms, 3000);
    let p = chi_square_fit(&tied, &[1.0, 1.0, 1.0]).unwrap();
    assert!(p > 1e-4, "tied arms not chosen evenly: {tied:?}, p = {p}");
}

/// Thompson sampling with fractional rewards: every reward becomes a success with that
/// probability, so the reported successes are whole and near `pulls × mean reward` (within
/// four binomial standard deviations), and the choices move to the better arm.
#[test]
fn thompson_keeps_an_exact_posterior_and_converges_through_the_host() {
    let dir = PluginDir::new();
    let host = bandit(&dir, json!({"algorithm": "thompson", "seed": 5}));
    let arms = ["good", "poor"];
    let reward = |arm: &str| if arm == "good" { 0.7 } else { 0.4 };
    let mut late_good = 0;
    for round in 0..3000 {
        let arm = choose(&host, &arms);
        update(&host, &arm, reward(&arm));
        if round >= 2000 && arm == "good" {
            late_good += 1;
        }
    }
    assert!(
        late_good > 900,
        "the better arm got {late_good} of the last 1000 choices"
    );
    let stats = host
        .execute("bandit", "stats", &json!({"context": "chat"}))
        .unwrap();
    assert_eq!(stats["chat"]["best"], "good", "{stats}");
    for arm in arms {
        let s = &stats["chat"]["arms"][arm];
        let pulls = s["pulls"].as_u64().unwrap() as f64;
        let successes = s["successes"].as_u64().expect("whole successes");
        let p = reward(arm);
        let expected = pulls * p;
        let sd = (pulls * p * (1.0 - p)).sqrt();
        assert!(
            (successes as f64 - expected).abs() <= 4.0 * sd + 1.0,
            "{arm}: {successes} successes in {pulls} pulls at reward {p}: {s}"
        );
        let mean = s["meanReward"].as_f64().unwrap();
        assert!((mean - p).abs() < 1e-9, "{arm}: mean reward {mean}, {s}");
    }
}
