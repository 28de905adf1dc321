"""rlhf/ppo.py end to end on configs/tiny.yaml: learning, value modes, LoRA, resume, checkpoints, saved policy.

prefs + reward run once per module (`upstream`); each PPO variant works on a copy of that run dir.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import rlhf.ppo as ppo
from accelerate.utils import DistributedType
from reward_models.judges import get_judge, parse_reward_spec, reward_function
from reward_models.model import score_texts
from rlhf import checkpoints, ppo_core
from rlhf.config import load_config, ppo_sizes
from rlhf.distributed import global_mean, sum_over_processes
from rlhf.models import load_causal_lm, load_reward_model, load_tokenizer
from rlhf.ppo_models import PolicyAndValue
from rlhf.prompts import encode_prompts
from rlhf.rollout import collect_rollout
from rlhf.pipeline import run_pipeline, work_dir
from rlhf.stages import MARKER, is_done, stage_identity
from rlhf.utils import TrainingFault, read_jsonl

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY = PROJECT_ROOT / "configs" / "tiny.yaml"
# fewer prefs prompts and one RM epoch: the PPO tests below reward the keyword judge, the RM only seeds the critic
BASE = ["tracking.wandb=off", "prefs.num_prompts=96", "reward.epochs=1", "eval.num_prompts=16"]
JUDGE = "ppo.reward=keyword:good"


def tiny_cfg(run_dir, *overrides):
    return load_config(TINY, [f"run.output_dir={run_dir}", *BASE, *overrides])


@pytest.fixture(scope="module")
def upstream(finished_reward_stage):
    return finished_reward_stage(*BASE)


def copy_upstream(upstream, dest: Path) -> Path:
    shutil.copytree(upstream, dest)
    return dest


def ppo_run(upstream, dest: Path, *overrides):
    run_dir = copy_upstream(upstream, dest)
    cfg = tiny_cfg(run_dir, *overrides)
    run_pipeline(cfg, only="ppo")
    assert is_done(cfg, run_dir, "ppo")
    return cfg, run_dir


def metrics(run_dir) -> list[dict]:
    return read_jsonl(Path(run_dir) / "ppo" / "metrics.jsonl")


def checkpoint_state(run_dir, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "ppo" / "checkpoints" / f"step_{step:05d}" / "trainable.safetensors"))


def base_weights() -> dict[str, torch.Tensor]:
    from rlhf.models import resolve_model

    return load_file(str(Path(resolve_model("tiny-llama")) / "model.safetensors"))


@pytest.fixture(scope="module")
def learned(upstream, tmp_path_factory):
    """The tiny PPO run (30 updates, critic from the RM) rewarded by the keyword judge."""
    return ppo_run(upstream, tmp_path_factory.mktemp("learned") / "run", JUDGE)


# ---------------------------------------------------------------------------------------------
# end to end


def test_ppo_learns_the_keyword(learned):
    cfg, run_dir = learned
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, cfg.ppo.num_updates + 1))
    gold = [r["objective/gold"] for r in rows]
    first, last = sum(gold[:3]) / 3, sum(gold[-5:]) / 5
    assert last > first + 1.0, gold
    for r in rows:
        for key in ("objective/kl", "objective/scores", "objective/rlhf_reward", "loss/policy_avg", "loss/value_avg",
                    "policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg", "val/error"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (key, r)
        # the judge is the reward: the score equals the gold score
        assert r["objective/scores"] == pytest.approx(r["objective/gold"])
        assert r["objective/rlhf_reward"] == pytest.approx(r["objective/scores"] + r["objective/non_score_reward"],
                                                           abs=1e-5)
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference on the first rollout
    assert rows[-1]["objective/kl"] > 0.1
    # linear decay over num_updates * ppo_epochs * (batch / mini_batch) optimiser steps, once per step
    steps_per_update = cfg.ppo.ppo_epochs * cfg.ppo.batch_size // cfg.ppo.mini_batch_size
    total = cfg.ppo.num_updates * steps_per_update
    assert rows[0]["lr"] == pytest.approx(cfg.ppo.learning_rate * (1 - steps_per_update / total))
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert rows[-1]["episodes"] == cfg.ppo.num_updates * cfg.ppo.batch_size
    # the last `keep_checkpoints` checkpoints, the final one included, and sample tables
    kept = sorted(p.name for p in (run_dir / "ppo" / "checkpoints").iterdir())
    assert kept == ["step_00020", "step_00030"]
    samples = read_jsonl(run_dir / "ppo" / "samples.jsonl")
    assert sorted({s["step"] for s in samples}) == [1, 10, 20, 30]


def test_saved_policy_is_plain_hf(learned):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    _, run_dir = learned
    folder = run_dir / "ppo" / "policy"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template  # kept with the tokenizer
    assert set(model.state_dict()) == set(AutoModelForCausalLM.from_pretrained(
        __import__("rlhf.models", fromlist=["resolve_model"]).resolve_model("tiny-llama")).state_dict())
    saved = load_file(str(folder / "model.safetensors"))
    base = base_weights()
    assert any(not torch.equal(saved[k], base[k]) for k in base)  # PPO changed the policy
    final = checkpoint_state(run_dir, 30)
    for k, v in saved.items():  # the saved policy is the last checkpoint's policy
        torch.testing.assert_close(v, final[f"policy.{k}"], atol=0, rtol=0)
    gen = pipeline("text-generation", model=model, tokenizer=tok)
    out = gen("write a story about the day", max_new_tokens=5, do_sample=False)
    assert isinstance(out[0]["generated_text"], str) and out[0]["generated_text"].startswith("write")


def test_value_head_mode_trains_its_head(upstream, tmp_path):
    cfg, run_dir = ppo_run(upstream, tmp_path / "run", JUDGE, "ppo.value_model=head", "ppo.num_updates=3")
    state = checkpoint_state(run_dir, 3)
    assert not any(k.startswith("critic.") for k in state)
    assert state["value_head.weight"].abs().sum() > 0  # zero-initialised, then trained
    assert state["value_head.bias"].abs().sum() > 0
    rows = metrics(run_dir)
    assert rows[0]["val/value_mean"] == 0.0  # the zero head predicts 0 on the first rollout
    assert all(math.isfinite(r["loss/value_avg"]) for r in rows)


def test_critic_mode_starts_from_the_reward_model_and_trains(upstream, tmp_path):
    cfg, run_dir = ppo_run(upstream, tmp_path / "run", JUDGE, "ppo.value_model=critic", "ppo.num_updates=3")
    state = checkpoint_state(run_dir, 3)
    assert "value_head.weight" not in state
    rm = load_file(str(run_dir / "reward" / "model" / "model.safetensors"))
    critic = {k[len("critic."):]: v for k, v in state.items() if k.startswith("critic.")}
    assert set(critic) == set(rm)  # same architecture as the reward model
    assert not torch.equal(critic["score.weight"], rm["score.weight"])
    assert any(not torch.equal(critic[k], rm[k]) for k in rm if k != "score.weight")
    # the first rollout's values are the RM's (unnormalised) outputs: not the zero of a fresh head
    assert metrics(run_dir)[0]["val/value_mean"] != 0.0


def test_critic_warmup_trains_the_critic_alone_first(upstream, tmp_path):
    cfg, run_dir = ppo_run(upstream, tmp_path / "run", JUDGE, "ppo.lora=true", "ppo.value_model=critic",
                           "ppo.lora_r=4", "ppo.critic_warmup_updates=2", "ppo.num_updates=3", "ppo.save_every=1",
                           "ppo.keep_checkpoints=3")
    rm = load_file(str(run_dir / "reward" / "model" / "model.safetensors"))
    for step in (1, 2, 3):
        state = checkpoint_state(run_dir, step)
        lora_b = [v for k, v in state.items() if k.startswith("policy.") and "lora_B" in k]
        assert lora_b, "the adapter's B matrices are checkpointed"
        policy_moved = any(v.abs().sum() > 0 for v in lora_b)  # B starts at 0: policy == reference
        assert policy_moved == (step == 3), f"after update {step}"
        assert not torch.equal(state["critic.score.weight"], rm["score.weight"])  # the critic trains throughout
    # rollouts 1-3 are sampled before updates 1-3: the first three from the unchanged policy
    assert [r["objective/kl"] for r in metrics(run_dir)] == [0.0, 0.0, 0.0]


def test_rloo_learns_without_a_value_function(upstream, tmp_path):
    """`ppo.value_model: none`: 4 answers per prompt, each measured against the other 3; no value weights
    are made, trained or saved, and the policy still learns."""
    cfg, run_dir = ppo_run(upstream, tmp_path / "run", JUDGE, "ppo.value_model=none", "ppo.samples_per_prompt=4",
                           "ppo.num_updates=10")
    rows = metrics(run_dir)
    gold = [r["objective/gold"] for r in rows]
    assert sum(gold[-3:]) / 3 > sum(gold[:3]) / 3 + 1.0, gold
    assert all(math.isfinite(r["loss/policy_avg"]) for r in rows)
    assert not any(k.startswith(("loss/value", "val/error", "val/value", "val/clipfrac")) for r in rows for k in r)
    state = checkpoint_state(run_dir, 10)
    assert state and all(k.startswith("policy.") for k in state)
    samples = [s for s in read_jsonl(run_dir / "ppo" / "samples.jsonl") if s["step"] == 1]
    queries = [s["query"] for s in samples]
    assert len(queries) == 8 and len(set(queries[:4])) == 1 and len(set(queries[4:])) == 1  # groups of 4 answers


def test_prompt_schedule_repeats_each_prompt_in_a_row():
    plain, grouped = ppo.PromptSchedule(20, 5, seed=3), ppo.PromptSchedule(20, 5, seed=3, repeats=4)
    for update in (0, 3, 4, 9):  # a new pass over the 20 prompts starts at update 4
        assert grouped.batch(update) == [i for i in plain.batch(update) for _ in range(4)]
    assert sorted(plain.batch(0) + plain.batch(1) + plain.batch(2) + plain.batch(3)) == list(range(20))


def test_compute_advantages_without_values_are_leave_one_out_returns():
    _, mask = random_batch(3)  # 4 answers: two prompts with 2 answers each
    B, T = mask.shape
    g = torch.Generator().manual_seed(5)
    rollout = SimpleNamespace(response_mask=mask, scores=torch.randn(B, generator=g),
                              logprobs=-torch.rand(B, T, generator=g), ref_logprobs=-torch.rand(B, T, generator=g),
                              values=None)
    cfg = SimpleNamespace(kl_estimator="k1", whiten_rewards=False, samples_per_prompt=2)
    out = ppo.compute_advantages(rollout, 0.1, cfg)
    assert out.returns is None
    rewards, _ = ppo_core.per_token_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask, 0.1)
    R = ppo_core.masked_sum(rewards, mask, dim=1)  # score - 0.1 * sequence KL
    loo = torch.stack([R[0] - R[1], R[1] - R[0], R[2] - R[3], R[3] - R[2]])  # each against its prompt's other
    expected = ppo_core.masked_whiten(loo[:, None].expand(B, T), mask)  # every token of an answer: its advantage
    torch.testing.assert_close(out.advantages, expected)
    m = mask.bool()
    assert (out.advantages[~m] == 0).all()
    assert out.advantages[m].mean().abs() < 1e-5 and out.advantages[m].std() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_exact_kl_loss_holds_the_policy_near_the_reference(upstream, tmp_path, lora):
    """`ppo.kl_loss_coef` adds KL(π ‖ π_ref) over the whole vocabulary to the loss: the same run drifts less
    from the reference (a separate frozen copy, or the LoRA base with its adapter disabled)."""
    settings = [JUDGE, "ppo.num_updates=6", "ppo.save_every=6", f"ppo.lora={str(lora).lower()}", "ppo.lora_r=4"]
    _, free = ppo_run(upstream, tmp_path / "free", *settings)
    _, held = ppo_run(upstream, tmp_path / "held", *settings, "ppo.kl_loss_coef=20")
    free_rows, held_rows = metrics(free), metrics(held)
    assert "policy/exact_kl_avg" not in free_rows[0]
    exact = [r["policy/exact_kl_avg"] for r in held_rows]
    assert all(math.isfinite(v) and v >= 0 for v in exact), exact
    kl = lambda rows: sum(r["objective/kl"] for r in rows[2:]) / len(rows[2:])  # noqa: E731
    assert kl(held_rows) < 0.5 * kl(free_rows), (kl(held_rows), kl(free_rows))


def test_entropy_bonus_keeps_the_policy_from_sharpening(upstream, tmp_path):
    """`ppo.entropy_coef` subtracts the policy's entropy over the vocabulary from the loss: the same run, seed and
    first rollout otherwise, trains a policy of higher entropy at every update, rising towards the maximum
    (the tiny random model starts near uniform: a wrong sign would lower it)."""
    settings = [JUDGE, "ppo.num_updates=6", "ppo.save_every=6", "ppo.lora=true", "ppo.lora_r=4"]
    _, plain = ppo_run(upstream, tmp_path / "plain", *settings)
    _, bonus = ppo_run(upstream, tmp_path / "bonus", *settings, "ppo.entropy_coef=10")
    plain_rows, bonus_rows = metrics(plain), metrics(bonus)
    assert bonus_rows[0]["objective/entropy"] == plain_rows[0]["objective/entropy"]  # the same first rollout
    plain_h, bonus_h = ([r["policy/entropy_avg"] for r in rows] for rows in (plain_rows, bonus_rows))
    assert all(b > p for b, p in zip(bonus_h, plain_h)), (bonus_h, plain_h)
    assert bonus_h == sorted(bonus_h) and bonus_h[-1] > plain_h[-1] + 0.01, (bonus_h, plain_h)


def test_lora_mode_saves_merged_policy(upstream, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, run_dir = ppo_run(upstream, tmp_path / "run", JUDGE, "ppo.lora=true", "ppo.value_model=head",
                           "ppo.num_updates=3", "ppo.lora_r=4")
    state = checkpoint_state(run_dir, 3)
    policy_keys = [k for k in state if k.startswith("policy.")]
    assert policy_keys and all("lora_" in k for k in policy_keys)  # only the adapter is trained
    folder = run_dir / "ppo" / "policy"
    saved = load_file(str(folder / "model.safetensors"))
    base = base_weights()
    assert not any("lora" in k for k in saved)
    assert set(saved) == set(base)
    assert any(not torch.equal(saved[k], base[k]) for k in base)
    assert all(torch.equal(saved[k], base[k]) for k in base if "embed" in k or "norm" in k)  # LoRA: linears only
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model(torch.tensor([[2, 10, 11]])).logits.shape[-1] == model.config.vocab_size
    rows = metrics(run_dir)
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # adapter disabled == enabled at B = 0
    assert all(math.isfinite(r["objective/kl"]) for r in rows)


def test_non_finite_reward_stops_the_stage(upstream, tmp_path, monkeypatch):
    def nan_score_fn(cfg, reward_dir, device, dtype):
        return lambda prompts, texts: torch.full((len(texts),), float("nan"))

    monkeypatch.setattr(ppo, "reward_function", nan_score_fn)
    run_dir = copy_upstream(upstream, tmp_path / "run")
    cfg = tiny_cfg(run_dir, "ppo.num_updates=2")
    with pytest.raises(TrainingFault, match="ppo update 1: non-finite reward scores for 32 of 32 responses"):
        run_pipeline(cfg, only="ppo")
    assert not (run_dir / "ppo" / MARKER).exists()


# ---------------------------------------------------------------------------------------------
# resume


def test_resume_reaches_the_same_result(upstream, tmp_path, monkeypatch, killed_at_update):
    overrides = [JUDGE, "ppo.num_updates=6", "ppo.save_every=3", "ppo.sample_every=2"]
    _, dir_a = ppo_run(upstream, tmp_path / "a", *overrides)

    dir_b = copy_upstream(upstream, tmp_path / "b")
    cfg_b = tiny_cfg(dir_b, *overrides)
    with killed_at_update(5):  # update 5: after the step-3 checkpoint and update 4's logs
        run_pipeline(cfg_b, only="ppo")
    work = work_dir(cfg_b, dir_b, "ppo")  # the unfinished stage's folder; dir_b/ppo does not exist yet
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["step_00003"]
    assert [r["step"] for r in read_jsonl(work / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not is_done(cfg_b, dir_b, "ppo") and not (dir_b / "ppo").exists()

    loaded = []
    real_load = checkpoints.load_checkpoint
    monkeypatch.setattr(checkpoints, "load_checkpoint",
                        lambda path, *a: loaded.append(Path(path).name) or real_load(path, *a))
    run_pipeline(cfg_b, only="ppo")
    assert loaded == ["step_00003"]
    assert is_done(cfg_b, dir_b, "ppo")

    rows_a, rows_b = metrics(dir_a), metrics(dir_b)
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]  # update 4's first log was dropped, not duplicated
    for ra, rb in zip(rows_a, rows_b):
        for key in ("objective/scores", "objective/kl", "objective/gold", "loss/policy_avg", "loss/value_avg",
                    "policy/approxkl_avg", "lr"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-5), (ra["step"], key)
    samples_a = read_jsonl(dir_a / "ppo" / "samples.jsonl")
    samples_b = read_jsonl(dir_b / "ppo" / "samples.jsonl")
    assert [s["step"] for s in samples_b] == [s["step"] for s in samples_a]
    assert [s["response"] for s in samples_b] == [s["response"] for s in samples_a]
    final_a = load_file(str(dir_a / "ppo" / "policy" / "model.safetensors"))
    final_b = load_file(str(dir_b / "ppo" / "policy" / "model.safetensors"))
    assert set(final_a) == set(final_b)
    for k in final_a:
        torch.testing.assert_close(final_b[k], final_a[k], atol=1e-6, rtol=0)
    state_a, state_b = checkpoint_state(dir_a, 6), checkpoint_state(dir_b, 6)
    for k in state_a:  # value model too
        torch.testing.assert_close(state_b[k], state_a[k], atol=1e-6, rtol=0)


def test_stop_kl_ends_training_at_the_first_rollout_that_reaches_it(upstream, tmp_path, monkeypatch):
    """`ppo.stop_kl`: the first rollout, once the policy has trained, whose KL to the reference reaches it ends
    the stage. Its policy is the final one, trained as far as an unstopped run's at that step; the checkpoint
    says so, the row holds the rollout and no training, and a run killed after the stop resumes to the end
    without training on."""
    overrides = [JUDGE, "ppo.num_updates=6", "ppo.save_every=1", "ppo.keep_checkpoints=10"]
    _, dir_a = ppo_run(upstream, tmp_path / "a", *overrides)
    kl = [r["objective/kl"] for r in metrics(dir_a)]  # kl[u]: the rollout of the policy trained u times
    # the first policy after the second update whose KL is above every earlier trained one's
    stop = next(u for u in range(2, 6) if kl[u] > max(0.0, *kl[1:u]))
    threshold = max((kl[stop] + max(kl[1:stop])) / 2, kl[stop] / 2)

    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed()

    dir_b = copy_upstream(upstream, tmp_path / "b")
    cfg_b = tiny_cfg(dir_b, *overrides, f"ppo.stop_kl={threshold}")
    monkeypatch.setattr(ppo, "save_final_policy", killed)  # killed after the stop's checkpoint
    with pytest.raises(Killed):
        run_pipeline(cfg_b, only="ppo")
    monkeypatch.undo()
    trained, real_update = [], ppo.ppo_update
    monkeypatch.setattr(ppo, "ppo_update", lambda *a, **k: trained.append(1) or real_update(*a, **k))
    run_pipeline(cfg_b, only="ppo")
    assert trained == [] and is_done(cfg_b, dir_b, "ppo")

    rows = metrics(dir_b)
    assert [r["step"] for r in rows] == list(range(1, stop + 2))
    assert [r["objective/kl"] for r in rows] == pytest.approx(kl[:stop + 1], abs=1e-6)
    assert rows[-1]["stopped"] == 1 and "loss/policy_avg" not in rows[-1] and "loss/policy_avg" in rows[-2]
    ckpts = dir_b / "ppo" / "checkpoints"
    assert checkpoints.trained_updates(dir_b / "ppo", 6) == stop
    assert checkpoints.stopped_at(ckpts, stop) == rows[-1]["objective/kl"] >= threshold
    assert checkpoints.stopped_at(ckpts, stop - 1) is None
    state_a, state_b = checkpoint_state(dir_a, stop), checkpoint_state(dir_b, stop)
    for k in state_a:
        torch.testing.assert_close(state_b[k], state_a[k], atol=1e-6, rtol=0)
    assert checkpoints.trained_updates(tmp_path / "no-such-stage", 6) == 6


def test_stop_kl_brake_scales_each_updates_learning_rate_by_its_kl(upstream, tmp_path):
    """`ppo.stop_kl_brake`: each update's learning rate is the schedule's times 1 - KL / stop_kl, from that
    update's rollout."""
    overrides = [JUDGE, "ppo.num_updates=4"]
    _, dir_a = ppo_run(upstream, tmp_path / "a", *overrides)
    stop_kl = 2 * max(r["objective/kl"] for r in metrics(dir_a)) + 1.0
    _, dir_b = ppo_run(upstream, tmp_path / "b", *overrides, f"ppo.stop_kl={stop_kl}", "ppo.stop_kl_brake=true")
    rows_a, rows_b = metrics(dir_a), metrics(dir_b)
    assert len(rows_b) == 4 and not any(r.get("stopped") for r in rows_b)
    for ra, rb in zip(rows_a, rows_b):
        assert rb["lr"] == pytest.approx(ra["lr"] * min(1, 1 - rb["objective/kl"] / stop_kl), rel=1e-6)
    assert rows_b[1]["lr"] < rows_a[1]["lr"] and rows_b[-1]["objective/kl"] != rows_a[-1]["objective/kl"]


def test_land_kl_moves_the_saved_policy_along_the_line_from_the_reference_to_that_kl(upstream, tmp_path):
    """`ppo.land_kl`: training is unchanged; the saved policy is W_ref + α (W_trained − W_ref), with α chosen on
    training prompts so that the exact KL there is the target, and `landing.json` says how."""
    from rlhf.landing import LAND_PROMPTS, LAND_SEED_OFFSET, measure_kl

    overrides = [JUDGE, "ppo.num_updates=6"]
    cfg_a, dir_a = ppo_run(upstream, tmp_path / "a", *overrides)
    tokenizer = load_tokenizer(cfg_a.model.policy)
    prompt_ids = ppo.training_prompts(cfg_a, tokenizer).input_ids[:LAND_PROMPTS]
    reference = load_causal_lm(cfg_a.model.policy).eval()

    def kl_of(policy_dir) -> float:
        policy = load_causal_lm(str(policy_dir)).eval()
        return measure_kl(policy, reference, prompt_ids, tokenizer, cfg_a.ppo, "cpu",
                          ppo.ppo_seed(cfg_a) + LAND_SEED_OFFSET)[0]

    trained_kl = kl_of(dir_a / "ppo" / "policy")
    target = trained_kl / 2
    _, dir_b = ppo_run(upstream, tmp_path / "b", *overrides, f"ppo.land_kl={target}")
    same = lambda row: {k: v for k, v in row.items() if k.startswith(("objective/", "loss/"))}  # noqa: E731
    assert [same(r) for r in metrics(dir_b)] == [same(r) for r in metrics(dir_a)]  # the same training
    landing = json.loads((dir_b / "ppo" / "landing.json").read_text())
    assert landing["target_kl"] == target and landing["prompts"] == len(prompt_ids)
    assert landing["steps"][0]["alpha"] == 1.0 and landing["steps"][0]["kl"] == pytest.approx(trained_kl, rel=1e-5)
    alpha = landing["alpha"]
    assert 0.5 < alpha < 0.9 and not landing["capped"]

    base = load_causal_lm(cfg_a.model.policy).state_dict()
    trained = load_causal_lm(str(dir_a / "ppo" / "policy")).state_dict()
    landed = load_causal_lm(str(dir_b / "ppo" / "policy")).state_dict()
    moved = [k for k in landed if not torch.equal(trained[k], base[k])]
    assert moved
    for k in moved:
        torch.testing.assert_close(landed[k], base[k] + alpha * (trained[k] - base[k]), rtol=1e-5, atol=1e-6)
    assert kl_of(dir_b / "ppo" / "policy") == pytest.approx(target, rel=0.1)


def test_next_scale_follows_kl_as_a_power_of_alpha_up_to_the_cap():
    from rlhf.landing import LAND_MAX_SCALE, growth_exponent, next_scale

    assert next_scale(1.0, 8.0, 2.0) == pytest.approx(0.5)
    assert next_scale(0.5, 1.0, 4.0) == pytest.approx(1.0)
    assert next_scale(1.0, 8.0, 1.0, exponent=3.0) == pytest.approx(0.5)
    assert next_scale(1.0, 1.0, 4.0) == LAND_MAX_SCALE  # 2.0 wanted: a policy that moved too little is not blown up
    assert next_scale(1.0, 0.0, 4.0) == LAND_MAX_SCALE and next_scale(1.0, -0.1, 4.0) == LAND_MAX_SCALE
    step = lambda alpha, kl: {"alpha": alpha, "kl": kl}  # noqa: E731
    assert growth_exponent([step(1.0, 6.0)]) == 2.0
    assert growth_exponent([step(1.0, 8.0), step(0.5, 8.0 / 0.5 ** -1.5)]) == pytest.approx(1.5)
    assert growth_exponent([step(1.0, 8.0), step(0.5, 7.9)]) == 1.0  # clamped to [1, 3]
    assert growth_exponent([step(1.0, 8.0), step(1.0, 7.0)]) == 2.0  # the same alpha twice: nothing to fit


def test_scale_lr_sets_the_schedules_rate_times_the_factor():
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 10)
    ppo.scale_lr(optimizer, scheduler, 0.25)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25e-3)
    optimizer.step()
    scheduler.step()  # the schedule's next rate, not compounded with the factor
    ppo.scale_lr(optimizer, scheduler, 0.25)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25 * 0.9e-3)
    ppo.scale_lr(optimizer, scheduler, 0.0)
    before = [p.detach().clone() for p in layer.parameters()]
    layer(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), before))  # a rate of 0 leaves the weights


def test_changed_config_restarts_instead_of_resuming(learned, tmp_path, monkeypatch):
    """A checkpoint of another PPO config is ignored: the stage starts over and drops the old logs."""
    _, src = learned
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    loaded = []
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda *a: loaded.append(a) or 0)
    cfg = tiny_cfg(run_dir, JUDGE, "ppo.num_updates=2", "ppo.save_every=1")
    run_pipeline(cfg, only="ppo")
    assert loaded == []
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert sorted(p.name for p in (run_dir / "ppo" / "checkpoints").iterdir()) == ["step_00001", "step_00002"]


# ---------------------------------------------------------------------------------------------
# checkpoints


def write_checkpoint(path: Path, fingerprint: str | None, weights: bool = True, state_text: str | None = None):
    path.mkdir(parents=True)
    if state_text is not None:
        (path / "trainer_state.json").write_text(state_text)
    elif fingerprint is not None:
        (path / "trainer_state.json").write_text(json.dumps({"update": int(path.name.split("_")[-1].split(".")[0]),
                                                             "fingerprint": fingerprint}))
    if weights:
        from safetensors.torch import save_file

        save_file({"policy.w": torch.zeros(2)}, str(path / "trainable.safetensors"))
        torch.save({"optimizer": {}}, path / "state.pt")


def test_latest_checkpoint_skips_incomplete_damaged_and_foreign(tmp_path, capsys):
    ckpts = tmp_path / "checkpoints"
    assert checkpoints.latest_checkpoint(ckpts, "fp") is None  # no folder at all
    write_checkpoint(ckpts / "step_00003", "fp")
    write_checkpoint(ckpts / "step_00004", "fp")
    write_checkpoint(ckpts / "step_00005", "other")  # another config
    write_checkpoint(ckpts / "step_00006", "fp", weights=False)  # weights missing
    write_checkpoint(ckpts / "step_00007", None, state_text='{"update": 7, "finger')  # truncated JSON
    write_checkpoint(ckpts / "step_00008", None, state_text="[]")  # JSON, but not a mapping
    write_checkpoint(ckpts / "step_00009", None)  # no trainer_state.json
    write_checkpoint(ckpts / ".step_00010.tmp", "fp")  # an unfinished atomic write
    write_checkpoint(ckpts / ".step_00011.old", "fp")  # the leftover of a replaced folder
    (ckpts / "step_00012").write_text("a file, not a folder")
    write_checkpoint(ckpts / "step_00013", "fp")
    with open(ckpts / "step_00013" / "trainable.safetensors", "r+b") as f:  # cut short by a crash
        f.truncate(f.seek(0, 2) // 2)
    write_checkpoint(ckpts / "step_00014", "fp")
    (ckpts / "step_00014" / "state.pt").write_bytes(b"")  # an optimiser state that was never written
    assert checkpoints.latest_checkpoint(ckpts, "fp") == ckpts / "step_00004"
    warnings = capsys.readouterr().err
    assert "step_00013 is damaged" in warnings and "step_00014 is damaged" in warnings
    assert checkpoints.latest_checkpoint(ckpts, "other") == ckpts / "step_00005"
    assert checkpoints.latest_checkpoint(ckpts, "nope") is None


def test_latest_checkpoint_of_a_real_run(learned):
    cfg, run_dir = learned
    ckpts = run_dir / "ppo" / "checkpoints"
    fp = stage_identity(cfg, run_dir, "ppo")
    assert checkpoints.latest_checkpoint(ckpts, fp) == ckpts / "step_00030"
    assert checkpoints.latest_checkpoint(ckpts, stage_identity(tiny_cfg(run_dir, JUDGE, "ppo.kl_coef=0.5"), run_dir, "ppo")) is None
    state = json.loads((ckpts / "step_00030" / "trainer_state.json").read_text())
    assert state["update"] == 30 and state["fingerprint"] == fp


# ---------------------------------------------------------------------------------------------
# small pieces


@pytest.mark.parametrize("spec, expected", [
    ("rm", [("rm", 1.0)]),
    ("vader", [("vader", 1.0)]),
    ("rm:1.0,vader:0.5", [("rm", 1.0), ("vader", 0.5)]),
    ("rm:2, vader:-0.5", [("rm", 2.0), ("vader", -0.5)]),
    ("keyword:good", [("keyword:good", 1.0)]),
    ("keyword:good:2", [("keyword:good", 2.0)]),
    ("rm:0.5,keyword:good", [("rm", 0.5), ("keyword:good", 1.0)]),
    ("mypkg.judges:score:1e-1", [("mypkg.judges:score", 0.1)]),
])
def test_parse_reward_spec(spec, expected):
    assert parse_reward_spec(spec) == expected


def test_reward_function_weighted_judges(upstream):
    cfg = tiny_cfg(upstream, "ppo.reward=keyword:good:2,keyword:bad:-1")
    fn = reward_function(cfg, upstream / "reward" / "model", "cpu", torch.float32)
    scores = fn(["p"] * 3, ["good good bad", "bad", "nothing"])
    assert scores.tolist() == [3.0, -1.0, 0.0]


def test_reward_function_rm_matches_score_texts(upstream):
    cfg = tiny_cfg(upstream, "ppo.reward=rm:1.0,keyword:good:0.5")
    rm_dir = upstream / "reward" / "model"
    fn = reward_function(cfg, rm_dir, "cpu", torch.float32)
    prompts, texts = ["write a story", "tell me about the day"], ["good day", "bad rain"]
    rm = load_reward_model(str(rm_dir)).eval()
    expected = score_texts(rm, load_tokenizer(str(rm_dir), padding_side="right"), prompts, texts) \
        + 0.5 * torch.tensor([1.0, 0.0])
    torch.testing.assert_close(fn(prompts, texts), expected, atol=1e-5, rtol=0)


class FakeAccelerator:
    """`reduce(sum)` adds the statistics of the other processes' batches, as an all-reduce would; on one
    process it also stands in for what `ppo_update` uses of an accelerator (no global state to leak)."""

    sync_gradients = True

    def __init__(self, others=()):
        self.others = list(others)
        self.num_processes = 1 + len(self.others)
        self.device = torch.device("cpu")
        self.distributed_type = DistributedType.NO

    def accumulate(self, model):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def unscale_gradients(self):
        pass

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        for values, mask in self.others:
            mask = mask.float()
            tensor = tensor + torch.stack([(values * mask).sum(), (values * values * mask).sum(), mask.sum()])
        return tensor


def random_batch(seed, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, T, generator=g) * 3 + 1
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).float()
    values = torch.where(mask.bool(), values, torch.tensor(float("nan")))  # junk where masked
    return values, mask


def test_sum_over_processes_is_the_whitening_hook():
    """With one process there is no hook (nothing is exchanged); with two, masked_whiten through the
    accelerator's sum whitens with the statistics of both batches: as whitening their concatenation."""
    assert sum_over_processes(FakeAccelerator()) is None
    (v0, m0), (v1, m1) = random_batch(1), random_batch(2)
    got = ppo_core.masked_whiten(v0, m0, reduce=sum_over_processes(FakeAccelerator([(torch.nan_to_num(v1), m1)])))
    both = ppo_core.masked_whiten(torch.cat([v0, v1]), torch.cat([m0, m1]))
    torch.testing.assert_close(got, both[: v0.shape[0]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, ppo_core.masked_whiten(v0, m0), atol=1e-3)


def test_global_mean_single_process():
    acc = FakeAccelerator()
    assert global_mean(torch.tensor(2.5), acc) == 2.5
    assert global_mean(3, acc) == 3.0


def test_compute_advantages_are_whitened_over_response_tokens():
    values, mask = random_batch(3)
    B, T = mask.shape
    g = torch.Generator().manual_seed(4)
    rollout = SimpleNamespace(response_mask=mask, scores=torch.randn(B, generator=g),
                              logprobs=-torch.rand(B, T, generator=g), ref_logprobs=-torch.rand(B, T, generator=g),
                              values=torch.nan_to_num(values))
    cfg = SimpleNamespace(kl_estimator="k1", whiten_rewards=False, gamma=1.0, lam=0.95)
    out = ppo.compute_advantages(rollout, 0.1, cfg)
    m = mask.bool()
    assert out.advantages[m].mean().abs() < 1e-5
    assert out.advantages[m].std() == pytest.approx(1.0, abs=1e-4)
    assert (out.advantages[~m] == 0).all() and (out.returns[~m] == 0).all()
    rewards, kl = ppo_core.per_token_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask, 0.1)
    torch.testing.assert_close(out.rewards, rewards)
    torch.testing.assert_close(out.kl, kl)


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_path_trains_fp32_weights_and_samples_from_a_bf16_copy(tmp_path, lora):
    """model.dtype=bfloat16: frozen models and the sampler in bf16, trained weights fp32 under autocast."""
    cfg = tiny_cfg(tmp_path / "run", JUDGE, "model.dtype=bfloat16", "ppo.num_updates=3", f"ppo.lora={str(lora).lower()}")
    run_pipeline(cfg)
    rows = metrics(tmp_path / "run")
    assert len(rows) == 3
    assert abs(rows[0]["objective/kl"]) < 0.5  # policy and reference agree up to bf16 rounding at the start
    assert all(math.isfinite(r["loss/policy_avg"]) and math.isfinite(r["objective/kl"]) for r in rows)
    state = checkpoint_state(tmp_path / "run", 3)
    assert all(v.dtype == torch.float32 for v in state.values())  # master weights stay fp32
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "ppo" / "policy")


@pytest.mark.parametrize("value", [[], ["ppo.value_model=none", "ppo.samples_per_prompt=4"]], ids=["critic", "rloo"])
def test_two_cpu_processes(upstream, tmp_path, value):
    """Distributed PPO on two CPU processes (gloo): statistics are reduced, one process writes; without a value
    function each process samples whole groups of answers."""
    import os
    import subprocess
    import sys

    run_dir = copy_upstream(upstream, tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rlhf.cli", "ppo",
           "configs/tiny.yaml", f"run.output_dir={run_dir}", *BASE, "ppo.num_updates=2", *value]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]  # written once, by the main process
    assert all(math.isfinite(r["objective/kl"]) and math.isfinite(r["loss/policy_avg"]) for r in rows)
    assert (run_dir / "ppo" / "policy" / "config.json").is_file()
    assert all(r["dist/num_processes"] == 2 for r in rows)
    if value:  # the main process's first rows: two prompts, four answers each
        queries = [s["query"] for s in read_jsonl(run_dir / "ppo" / "samples.jsonl") if s["step"] == 1]
        assert len(set(queries[:4])) == 1 and len(set(queries[4:8])) == 1 and queries[0] != queries[4]


def test_two_cpu_processes_stop_together(upstream, tmp_path):
    """`ppo.stop_kl` on two processes: both read the KL reduced over them, stop at the same update and save the
    stop's checkpoint together (one waiting for the other would hang the run)."""
    import os
    import subprocess
    import sys

    run_dir = copy_upstream(upstream, tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rlhf.cli", "ppo",
           "configs/tiny.yaml", f"run.output_dir={run_dir}", *BASE, JUDGE, "ppo.num_updates=6", "ppo.stop_kl=1e-9"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = metrics(run_dir)
    assert [r.get("stopped") for r in rows] == [None] * (len(rows) - 1) + [1] and len(rows) < 6
    assert rows[-1]["objective/kl"] >= 1e-9 and "PPO stops after" in proc.stderr
    assert checkpoints.trained_updates(run_dir / "ppo", 6) == len(rows) - 1


def test_clip_gradients_scales_only_above_the_limit():
    from rlhf.ppo import clip_gradients

    accelerator = FakeAccelerator()
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])  # global norm 5
    assert clip_gradients(accelerator, [a, b], 1.0).item() == pytest.approx(5.0)
    assert torch.cat([a.grad, b.grad]).norm().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.0]), rtol=1e-5, atol=0)
    a.grad, b.grad = torch.tensor([0.3, 0.0]), torch.tensor([0.0, 0.4])  # norm 0.5: left as it is
    grad = a.grad
    assert clip_gradients(accelerator, [a, b], 1.0).item() == pytest.approx(0.5)
    assert a.grad is grad and a.grad.tolist() == pytest.approx([0.3, 0.0])
    assert clip_gradients(accelerator, [torch.nn.Parameter(torch.zeros(1))], 1.0).item() == 0.0  # no gradients


def test_total_norm_matches_float64_and_falls_back_off_float32():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(300, 70, generator=g) * 3, torch.randn(5, generator=g), torch.randn(2, 3, generator=g).t()]
    exact = torch.cat([t.double().reshape(-1) for t in tensors]).norm().item()
    assert ppo.total_norm(tensors).item() == pytest.approx(exact, rel=1e-6)  # incl. a non-contiguous tensor
    halves = [t.bfloat16() for t in tensors]
    assert ppo.total_norm(halves).item() == pytest.approx(exact, rel=1e-2)  # torch's own norm for other dtypes
    assert ppo.total_norm([torch.tensor([float("inf"), 1.0])]).isinf()
    assert ppo.total_norm([]).item() == 0.0


@pytest.mark.parametrize("value_model", ["critic", "head"])
def test_a_kept_rollout_forward_is_the_first_epochs_forward(tmp_path, value_model):
    """One micro-batch per epoch: the rollout's forward, kept with its graph, replaces the first epoch's.
    The update must be the one that computes it again (same weights after two epochs, same stats), with
    one forward pass fewer."""
    pc = tiny_cfg(tmp_path, "ppo.batch_size=8", "ppo.mini_batch_size=8", "ppo.ppo_epochs=2",
                  f"ppo.value_model={value_model}").ppo
    sizes = ppo_sizes(pc)
    assert sizes.micro_batch_size == 8
    tok = load_tokenizer("tiny-llama")
    prompts = ["write a good story", "tell me about your day", "describe the weather", "review a movie",
               "write about the city", "a story about a dog", "describe your family", "review the food"]
    ids = encode_prompts(prompts, tok, max_tokens=64).input_ids
    torch.manual_seed(0)
    critic = load_reward_model("tiny-llama") if value_model == "critic" else None
    base = PolicyAndValue(load_causal_lm("tiny-llama"), critic).eval()
    ref = load_causal_lm("tiny-llama").eval()
    judge = get_judge("keyword:good")
    P = max(len(x) for x in ids)

    def run(keep):
        model = copy.deepcopy(base)
        full_passes = []  # trunk forwards over prompt + response (not generation's prefill and steps)
        trunk = model.critic.base_model if critic is not None else model.policy.model
        trunk.register_forward_pre_hook(lambda m, a, kw: full_passes.append(1) if kw["input_ids"].shape[1] == P + 6
                                        else None, with_kwargs=True)
        torch.manual_seed(1)
        r, kept = collect_rollout(model, ref, prompts, ids, tok,
                                  lambda p, t: torch.tensor(judge(t), dtype=torch.float32), None, max_new_tokens=6,
                                  temperature=1.0, stop_ids=[], micro_batch_size=8, min_new_tokens=6,
                                  keep_forward=keep)
        assert (kept is not None) == keep
        if keep:
            assert kept.values.requires_grad and torch.equal(kept.values.detach(), r.values)
        r = ppo.compute_advantages(r, 0.05, pc)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)  # linear in the gradients
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        stats = ppo.ppo_update(model, optimizer, scheduler, r, pc, sizes, FakeAccelerator(), first_forward=kept)
        return r, stats, model, len(full_passes)

    r0, stats0, model0, passes0 = run(False)
    r1, stats1, model1, passes1 = run(True)
    assert torch.equal(r0.responses.ids, r1.responses.ids)
    torch.testing.assert_close(r1.logprobs, r0.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(r1.values, r0.values, atol=1e-5, rtol=0)
    assert stats1.keys() == stats0.keys()
    for key in stats0:
        assert stats1[key] == pytest.approx(stats0[key], rel=1e-4, abs=1e-6), key
    moved = 0
    for (name, p0), (_, p1) in zip(model0.named_parameters(), model1.named_parameters()):
        torch.testing.assert_close(p1, p0, atol=1e-5, rtol=1e-4, msg=name)
        moved += not torch.equal(p0, dict(base.named_parameters())[name])
    assert moved > 0  # the update did change weights
    assert passes1 == passes0 - 1  # the first epoch's forward was not computed again
