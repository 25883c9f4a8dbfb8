//! `pipelines/paper-alpacafarm.yaml`, the RBoN paper's setting: validate names every model it
//! would load and where from, and with the tiny fixtures of each family in place of the published
//! checkpoints (same loaders: Mistral policy, SteamSHP T5 judge, DeBERTa reward model, Eurus-RM
//! head, MiniLM) it runs end to end.

#![allow(clippy::unwrap_used, reason = "tests: unwraps are the assertions")]

mod common;

use std::fs;
use std::process::Command;

use common::{read, repo, text};

const HUB_IDS: [(&str, &str); 5] = [
    ("HuggingFaceH4/mistral-7b-sft-beta", "tiny-mistral"),
    ("stanfordnlp/SteamSHP-flan-t5-large", "tiny-shp"),
    ("OpenAssistant/reward-model-deberta-v3-large-v2", "tiny-deberta-rm"),
    ("openbmb/Eurus-RM-7b", "tiny-eurus-rm"),
    ("sentence-transformers/all-MiniLM-L6-v2", "tiny-minilm"),
];

/// The commented-out PairRM judge, and its fixture.
const PAIRRM: (&str, &str) = ("llm-blender/PairRM-hf", "tiny-pairrm");

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    fs::create_dir_all(to).unwrap();
    for f in fs::read_dir(from).unwrap() {
        let f = f.unwrap().path();
        let dest = to.join(f.file_name().unwrap());
        if f.is_dir() { copy_dir(&f, &dest) } else { fs::copy(&f, dest).map(|_| ()).unwrap() }
    }
}

fn paper() -> String {
    fs::read_to_string(repo().join("pipelines/paper-alpacafarm.yaml")).unwrap()
}

/// The pipeline with every hub id replaced by its fixture, on the CPU, over a few prompts.
fn with_fixtures() -> String {
    let mut yaml = paper();
    for (id, fixture) in HUB_IDS {
        assert!(yaml.contains(id), "{id}");
        yaml = yaml.replace(id, &repo().join("data/models").join(fixture).display().to_string());
    }
    let r = |y: String, a: &str, b: &str| {
        assert!(y.contains(a), "{a}");
        y.replace(a, b)
    };
    // With PairRM's win rate as a third gold.
    yaml = r(yaml, "    # - { name: pairrm", "    - { name: pairrm");
    yaml = r(yaml, "gold: [oasst, eurus]", "gold: [oasst, eurus, pairrm]");
    yaml = yaml.replace(PAIRRM.0, &repo().join("data/models").join(PAIRRM.1).display().to_string());
    yaml = r(yaml, "data/prompts/", &format!("{}/data/prompts/", repo().display()));
    yaml = r(yaml, "pipelines/templates/", &format!("{}/pipelines/templates/", repo().display()));
    yaml = r(yaml, "output: runs/paper-alpacafarm", "output: out");
    yaml = r(yaml, "  shard_size: 16", "  shard_size: 2\n  limit: 4");
    yaml = r(yaml, "  n: 32", "  n: 6");
    yaml = r(yaml, "max_new_tokens: 512", "max_new_tokens: 12");
    r(yaml, "devices: [cuda:*]", "devices: [cpu]")
}

#[test]
fn validate_names_each_published_model_it_cannot_find_and_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hf-cache");
    fs::create_dir_all(&cache).unwrap();
    let yaml = paper().replace("data/prompts/", &format!("{}/data/prompts/", repo().display()));
    fs::write(dir.path().join("paper.yaml"), yaml).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_rbon"))
        .args(["validate", "paper.yaml"])
        .current_dir(dir.path())
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(78), "{}", text(&o));
    let t = text(&o);
    for (id, _) in HUB_IDS {
        assert!(t.contains(id), "{id}: {t}");
    }
    assert!(t.contains(&cache.display().to_string()) && t.contains("huggingface-cli download"), "{t}");

    // With each model in the cache (here: the fixtures under the published ids), validate says
    // which snapshot folder each resolves to.
    let rev = "0123456789abcdef0123456789abcdef01234567";
    for (id, fixture) in HUB_IDS {
        let repo_dir = cache.join(format!("models--{}", id.replace('/', "--")));
        fs::create_dir_all(repo_dir.join("refs")).unwrap();
        fs::write(repo_dir.join("refs/main"), rev).unwrap();
        copy_dir(&repo().join("data/models").join(fixture), &repo_dir.join("snapshots").join(rev));
    }
    // (The tiny policy has 512 positions, the real one 32768.)
    let cpu = fs::read_to_string(dir.path().join("paper.yaml"))
        .unwrap()
        .replace("devices: [cuda:*]", "devices: [cpu]")
        .replace("max_new_tokens: 512", "max_new_tokens: 256");
    fs::write(dir.path().join("paper-cpu.yaml"), cpu).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_rbon"))
        .args(["validate", "paper-cpu.yaml"])
        .current_dir(dir.path())
        .env("HF_HUB_CACHE", &cache)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("805 prompts"), "{t}");
    for (id, _) in HUB_IDS {
        let snap = cache.join(format!("models--{}", id.replace('/', "--"))).join("snapshots").join(rev);
        assert!(t.contains(&format!("{id} → {}", snap.display())), "{id}: {t}");
    }
}

#[test]
fn the_papers_pipeline_runs_end_to_end_on_fixtures_of_its_models() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("paper.yaml"), with_fixtures()).unwrap();
    let o = common::rbon(&["validate", "paper.yaml"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("ok (paper-alpacafarm → out, 4 prompts)"), "{t}");
    for (role, what) in [
        ("policy: ", "mistral MistralForCausalLM, chat template auto, bf16"),
        ("reward shp (proxy): ", "t5 T5ForConditionalGeneration; SteamSHP judge: P(\"A\")"),
        ("reward oasst (gold): ", "deberta-v2 DebertaV2ForSequenceClassification; text-pair classifier"),
        ("reward eurus (gold): ", "mistral EurusRewardModel; head `regression_head` at the last token"),
        ("reward pairrm (gold): ", "deberta-v2 DebertaV2PairRM; PairRM: each sample against the prompt's others"),
        ("embedding: ", "bert BertModel; mean-pooled"),
    ] {
        let at = t.find(role).unwrap_or_else(|| panic!("{role}: {t}"));
        assert!(t[at..].lines().nth(1).unwrap().contains(what), "{role}{what}: {t}");
    }

    let o = common::rbon(&["run", "--quiet", "paper.yaml"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let out = dir.path().join("out");
    let summary = read(&out.join("report/summary.parquet"));
    for col in ["reward_shp_mean", "reward_oasst_mean", "reward_eurus_mean", "p_vs_bon_oasst", "p_vs_bon_eurus"] {
        assert!(summary.column_by_name(col).is_some(), "{col}");
    }
    // SHP's reward is a probability.
    let scores = read(&out.join("scores/shard-00000.parquet"));
    let shp = scores.column_by_name("reward_shp").unwrap();
    let shp = shp.as_any().downcast_ref::<arrow_array::Float64Array>().unwrap();
    assert_eq!(shp.len(), 2 * 6);
    assert!(shp.values().iter().all(|p| (0.0..=1.0).contains(p)), "{shp:?}");
    // PairRM's win rates of one prompt's 6 samples: shares of 5 comparisons, averaging ½.
    let win = scores.column_by_name("reward_pairrm").unwrap();
    let win = win.as_any().downcast_ref::<arrow_array::Float64Array>().unwrap();
    let first: Vec<f64> = win.values()[..6].to_vec();
    assert!(first.iter().all(|w| (w * 10.0).fract() == 0.0 && (0.0..=1.0).contains(w)), "{first:?}");
    assert!((first.iter().sum::<f64>() / 6.0 - 0.5).abs() < 1e-12, "{first:?}");
    assert!(out.join("pairs/rbon_wd/beta=0.1/train-00000-of-00001.parquet").is_file());
    let md = fs::read_to_string(out.join("report/report.md")).unwrap();
    assert!(md.contains("## Against BoN: paired test on gold `eurus`"), "{md}");
}
