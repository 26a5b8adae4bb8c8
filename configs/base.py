"""Every config key of diffusion_jax, with defaults. Other configs import this and override
values; they never add keys (the config is locked, so a typo in an override is an error).

Run:  python -m diffusion_jax.main --config=configs/base.py --workdir=runs/base
(equivalent to configs/digits_unet.py's defaults but with a longer run.)
"""

import ml_collections

from diffusion_jax import lora
from diffusion_jax.models.autoencoder import AUTOENCODER_PRESETS
from diffusion_jax.models.dit import DIT_PRESETS
from diffusion_jax.models.unet import UNET_PRESETS
from diffusion_jax.timesteps import LAMBDA_MIN


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # model: `name` picks the architecture; only model[name] goes to its constructor,
    # plus num_classes and compute dtype (see diffusion_jax/models/__init__.py).
    c.model = ml_collections.ConfigDict()
    c.model.name = "unet"  # unet | dit | autoencoder | classifier | clip
    c.model.num_classes = 0  # 0 = unconditional; >0 adds a null class for guidance
    # the guidance scale as an input (a consistency student over a range of scales)
    c.model.guidance_input = False
    c.model.compute_dtype = "float32"  # float32 | bfloat16 (params stay float32)
    # Defaults copied from the presets (one source of truth for architecture numbers).
    c.model.unet = ml_collections.ConfigDict(
        dict(
            UNET_PRESETS["digits"],
            conv_impl="xla",
            out_channels=None,
            time_cos_first=True,  # timestep sinusoid layout (imported DDPM weights: False, 1.0)
            time_freq_shift=0.0,
        )
    )
    c.model.dit = ml_collections.ConfigDict(
        dict(
            DIT_PRESETS["DiT-S/2"],
            freq_embed_dim=256,
            time_init_std=0.02,
            label_init_std=0.02,
            out_channels=None,
        )
    )
    # Text-to-image (models/text.py): vocab_size 0 = no captions; else the size of the
    # dataset's tokenizer (its words + padding + unknown; a run checks it and names the
    # value), and the denoiser reads captions of up to max_length words through a
    # transformer encoder trained with it. conditioning: "cross" (cross-attention at the
    # UNet's attention resolutions / in every DiT block) | "pooled" (the mean caption
    # embedding added where a class embedding goes).
    c.model.text = ml_collections.ConfigDict(
        dict(vocab_size=0, max_length=16, width=128, depth=2, num_heads=4, conditioning="cross")
    )
    # Noise-aware guides (models/guide.py, guides.py) for classifier and CLIP guidance:
    # model.name=classifier (one head per attribute: head_sizes) or clip (its text tower
    # is model.text's encoder).
    guide = dict(channels=(64, 128), num_res_blocks=1, features=128, norm_groups=8)
    c.model.classifier = ml_collections.ConfigDict(dict(guide, head_sizes=(10,)))
    c.model.clip = ml_collections.ConfigDict(dict(guide, embed_dim=128))
    c.model.autoencoder = ml_collections.ConfigDict(
        dict(AUTOENCODER_PRESETS["fashion-f4"], conv_impl="xla")
    )

    # Latent diffusion: the autoencoder workdir whose latents data.name=latents holds
    # ("" = pixel space). Samples, grids, editing and metrics decode with it.
    c.latent = ml_collections.ConfigDict()
    c.latent.autoencoder = ""

    # Consistency models (diffusion_jax/consistency.py). mode "" = an ordinary run;
    # "distill": from the teacher workdir, whose model and schedule the student has and
    # whose EMA weights it starts from (optim.ema_decay is the target network's: LCM 0.95);
    # "train": iCT without a teacher (curriculum over train.num_steps).
    c.consistency = ml_collections.ConfigDict()
    c.consistency.mode = ""  # "" | distill | train
    c.consistency.teacher = ""
    c.consistency.num_grid_steps = 40  # distill: N, teacher DDIM steps of T/N indices
    c.consistency.teacher_guidance = 1.0  # CFG scale of a conditional teacher
    # > 0: each example draws its teacher scale w uniformly from [teacher_guidance,
    # teacher_guidance_max] and the student (model.guidance_input=True) gets w as an input
    # (LCM), so it samples at any scale in one forward per step
    c.consistency.teacher_guidance_max = 0.0
    c.consistency.distance = "pseudo_huber"  # pseudo_huber | l2
    c.consistency.huber_c = 0.0  # 0 = 0.00054 sqrt(dim) (iCT)

    # Adapting a trained model (diffusion_jax/adapters.py): kind "" = an ordinary run;
    # "full" fine-tunes every weight of the base workdir, starting from its EMA weights;
    # "lora" trains only W + (alpha / rank) * A @ B on the kernels whose "/"-joined path
    # matches a pattern of targets (diffusion_jax/lora.py), the base frozen.
    c.adapter = ml_collections.ConfigDict()
    c.adapter.kind = ""  # "" | full | lora | controlnet
    c.adapter.base = ""
    c.adapter.rank = 4
    c.adapter.alpha = 4.0
    c.adapter.targets = lora.DEFAULT_TARGETS
    # "controlnet" (UNet bases, pixel data): a trainable copy of the base's encoder fed the
    # control (diffusion_jax/controls.py: edges | mask) of each training image through a
    # conv stem of hint_channels; its zero-initialised outputs join the frozen base.
    c.adapter.control = "edges"
    c.adapter.hint_channels = (16, 32)

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "linear"  # see diffusion_jax.schedules.SCHEDULES
    c.schedule.num_timesteps = 1000
    c.schedule.zero_terminal_snr = False

    c.objective = ml_collections.ConfigDict()
    c.objective.prediction = "eps"  # eps | x0 | v
    c.objective.weighting = "uniform"  # uniform | min_snr
    c.objective.min_snr_gamma = 5.0
    c.objective.label_dropout = 0.1  # classifier-free guidance: label or caption dropout
    # Learned variance (Nichol & Dhariwal 2021): the model outputs 2C channels (the
    # prediction and the interpolation v of log beta_tilde..log beta); the loss becomes
    # L_simple + vlb_weight * L_vlb (the hybrid loss). Sample with sampler.variance=learned.
    c.objective.learn_sigma = False
    c.objective.vlb_weight = 0.001
    # Autoencoders (model.name=autoencoder): recon_l1_weight * |x - x'| +
    # recon_l2_weight * (x - x')^2 (per-pixel means) + kl_weight * KL(q(z|x) || N(0, I))
    # (summed over latent elements, averaged over the batch; LDM uses ~1e-6).
    c.objective.recon_l1_weight = 1.0
    c.objective.recon_l2_weight = 0.0
    c.objective.kl_weight = 1e-6

    c.sampler = ml_collections.ConfigDict()
    # ddpm | ddim | euler | heun | dpmpp_2m | dpmpp_2m_sde | consistency
    c.sampler.name = "ddim"
    c.sampler.num_steps = 50  # every sampler but ddpm (see respacing)
    # ddpm: 0 = all T steps (Ho et al.); N = N steps of the respaced chain on the
    # sampler.spacing grid (Nichol & Dhariwal 2021 sec. 4; DiT's 250 is spacing=linspace)
    c.sampler.respacing = 0
    c.sampler.eta = 0.0
    c.sampler.spacing = "leading"  # leading | trailing | linspace | logsnr
    # logsnr only: the grid starts where lambda = log(alpha / sigma) >= lambda_min, not at
    # a cosine/sigmoid schedule's clipped last step (lambda -9.9 / -7.5), where an eps
    # model's x0 amplifies its error 2e4x (see timesteps.LAMBDA_MIN); -inf: the whole range
    c.sampler.lambda_min = LAMBDA_MIN
    # ddpm: fixedlarge (beta) | fixedsmall (beta_tilde) | learned (objective.learn_sigma)
    c.sampler.variance = "fixedlarge"
    c.sampler.clip_x0 = True
    c.sampler.guidance_scale = 1.0  # 1 = plain conditional; 0 = unconditional

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # digits (bundled, offline) or any tfds dataset name
    c.data.data_dir = ""  # "" = ~/.cache/diffusion_jax/tensorflow_datasets
    c.data.split = "train"
    c.data.image_size = 8
    # How images of another size become image_size x image_size: "bilinear" (center crop
    # to a square, then PIL resize) or "pad" (center-pad with the background, value 0;
    # never scales, so image_size must be >= the stored size; Fashion-MNIST 28 -> 32).
    c.data.resize_method = "bilinear"
    c.data.random_flip = False
    c.data.worker_count = 0  # grain worker processes (0 = in the main process)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 100
    c.optim.decay = "constant"  # constant | cosine
    c.optim.final_lr_fraction = 0.0  # cosine decay ends at learning_rate * this
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip_norm = 1.0  # 0 disables
    c.optim.ema_decay = 0.999
    c.optim.ema_warmup = True  # decay ramps as (1+step)/(10+step) up to ema_decay

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 3000
    c.train.batch_size = 128  # global, over all devices and processes
    c.train.parallel = "jit"  # jit | pmap
    c.train.steps_per_dispatch = 1  # >1: lax.scan over several steps per call
    c.train.log_every_steps = 50
    c.train.quiet = False  # plain log lines instead of a redrawn progress bar
    c.train.compilation_cache_dir = ""  # "" = ~/.cache/diffusion_jax/xla; "off" disables

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 1000  # sample grid from EMA params (0 = only at the end)
    c.eval.num_samples = 64
    # In-loop sample-quality metrics (FID/KID/precision/recall; class accuracy when
    # class-conditional) on EMA params with a fixed seed; 0 = off. Digits use the
    # project's own classifier features, other datasets InceptionV3 (local weights).
    c.eval.metrics_every_steps = 0
    c.eval.metrics_num_samples = 500
    c.eval.metrics_seed = 1234
    # Autoencoders: the split whose reconstructions give PSNR, SSIM and reconstruction FID.
    c.eval.heldout_split = "test"
    c.eval.cache_dir = ""  # "" = ~/.cache/diffusion_jax/eval
    c.eval.inception_weights = ""  # .npz/.pkl path (see diffusion_jax/evaluation/inception.py)

    c.ckpt = ml_collections.ConfigDict()
    c.ckpt.every_steps = 1000
    c.ckpt.keep = 3
    c.ckpt.async_save = True
    return c
