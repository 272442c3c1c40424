"""SofT-GRPO on DeepSeek-R1-Distill-Qwen-1.5B with DeepScaleR (SofT-GRPO-deepscaler-8k.sh; docs/algorithm.md, "Settings of the original runs").

Every setting of the seed script, one line each. Bring the model (HF directory) and DeepScaleR's train.parquet
(TFDS manual_dir, see README) yourself.
"""

from softgrpo_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "softgrpo-deepscaler-1p5b"
    c.model.path = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"  # replace with your local HF directory
    c.model.param_dtype = "float32"  # FSDP master weights are float32 in verl
    c.model.compute_dtype = "bfloat16"  # bf16 autocast
    c.data.train = "deepscaler"
    c.data.eval = ("aime24:test", "amc23:test", "math500:test")
    c.data.max_prompt_length = 1024  # filter_overlong_prompts=True
    c.data.shuffle = True
    # rollout: rollout.temperature/top_p/top_k = 1/0.95/5, after_thinking_* equal, tau 0.1, Gumbel noise, c = 1
    c.rollout.mode = "gumbel"
    c.rollout.max_topk = 5
    c.rollout.temperature = 1.0
    c.rollout.top_k = 5
    c.rollout.top_p = 0.95
    c.rollout.after_thinking_temperature = 1.0
    c.rollout.after_thinking_top_k = 5
    c.rollout.after_thinking_top_p = 0.95
    c.rollout.tau = 0.1
    c.rollout.noise = "gumbel"
    c.rollout.noise_factor = 1.0
    c.rollout.early_stopping_entropy_threshold = 0.0  # cold stop off
    c.rollout.max_new_tokens = 8192  # max_response_length
    # GRPO: n 8, 64 prompts/step, mini-batch 32 prompts (2 updates/step), micro 2/GPU, epochs 1
    c.rl.algorithm = "softgrpo"
    c.rl.group_size = 8
    c.rl.train_batch_size = 64
    c.rl.mini_batch_size = 32
    c.rl.micro_batch_size = 2
    c.rl.ppo_epochs = 1
    c.rl.clip_ratio_low = 0.2
    c.rl.clip_ratio_high = 0.2
    c.rl.clip_ratio_c = 3.0
    c.rl.use_kl_loss = True
    c.rl.kl_coef = 0.001
    c.rl.kl_type = "low_var_kl"
    c.rl.loss_agg_mode = "token-mean"
    c.rl.train_temperature = 1.0
    c.rl.logprob_chunk_size = 1024  # rows per chunk of vocabulary logits: 0.6 GB of float32 at V = 151936
    c.model.remat = True  # gradient checkpointing is off in the seed (80 GB GPUs + FSDP offload); on here for memory
    # AdamW lr 1e-6 constant, no warmup, wd 0.01, grad clip 1.0
    c.optim.lr = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0
    c.optim.schedule = "constant"
    c.reward.mode = "strict_string"  # the seed's boxed-string reward (math_verify is our default elsewhere)
    c.trainer.total_steps = 0  # one epoch
    c.trainer.save_every = 200
    c.trainer.eval_every = 40  # test_freq
    c.trainer.eval_before = True  # val_before_train
    c.trainer.output_dir = "runs/softgrpo-deepscaler-1p5b"
    c.trainer.mesh = (1, -1, 1)  # FSDP over every device
    # validation: do_sample, T 0.6, top_p 0.95, top_k 5, n 1, Gumbel settings unchanged (tau 0.1, noise on)
    c.eval.mode = "gumbel"
    c.eval.n_samples = 1
    c.eval.temperature = 0.6
    c.eval.top_k = 5
    c.eval.top_p = 0.95
    c.eval.max_topk = 5
    c.eval.tau = 0.1
    c.eval.max_new_tokens = 8192
    c.eval.ks = (1,)
    c.eval.batch_size = 128  # val_batch_size
    return c
