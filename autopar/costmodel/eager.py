"""What an eager PyTorch training step costs beyond the transformer ops' roofline (issue 13).

Each term was missing from the per-op model and is found in the measured H200 corpus
(bench/results/truth_h200_2026-11-30.json; bench/truth/README.md describes the buckets).
The setting is the common recipe: bf16 autocast, fp32 master weights and gradients, fused
AdamW, the zoo's cross-entropy on fp32 logits. Constants marked "fitted" come from the GPT
rows of the corpus only (`python bench/truth/predict.py --fit` recomputes them); the Llama rows
are held out to check them.

Time:
- optimizer: fused AdamW moves 28 B per parameter (reads fp32 weight, grad, m, v; writes
  weight, m, v) at 3.47 TB/s on H200 (optimizer bucket of every row: 3.3-3.5 TB/s), 0.79 of the
  same GPU's streaming `add` bandwidth; other GPUs take the same share of theirs.
- cross-entropy in fp32: `F.cross_entropy` on bf16 logits upcasts them (read 2, write 4 B per
  logit), log-softmax (4 + 4), and in backward the NLL gradient (4), the log-softmax gradient
  (4 + 4 + 4) and the cast back (4 + 2): 36 B per logit element.
- precision casts: autocast casts every fp32 weight to bf16 once per autocast region (read 4,
  write 2 B per parameter; the step's one region holds all its microbatches; over FSDP2's
  bf16 parameters autocast casts nothing, and FSDP2 casts each fp32 shard for every all-gather
  instead, `fsdp_weight_cast_params`), every
  microbatch's bf16 weight gradient is cast to fp32 (2 + 4) and, after the first microbatch,
  added into `.grad` (4 + 4 + 4): the "~18 B/param per microbatch" of the pp rows.
- autocast's fp32 residual stream: autocast runs layer_norm (and rms_norm) in fp32, so the
  norms read and write fp32 and so do the residual adds that take their fp32 outputs back, and
  every linear fed by a norm casts its input to bf16 itself; backward, each cast's gradient
  comes back to fp32 and the gradients are summed in fp32. Priced kernel by kernel at each
  kind's measured bandwidth at its size (`autocast_norm_s`, `fp32_residual_add_s`; the kinds
  `cast_widen`, `cast_narrow` and `accumulate` of the profile, which bench/elementwise_sizes.py
  measured: a bf16 -> fp32 cast runs at half an fp32 -> bf16 one's rate), in place of the
  graph's bf16 norm and add. In a compiled block Inductor fuses them (below).
- the eager kernels the graph's ops do not hold, kernel by kernel at their kinds' rates: a
  linear's bias gradient, a sum over the tokens (`bias_grad_sum_s`, the `token_sum` kind:
  17 ms of gpt-1.3b mb8's step); rotary embedding's ten kernels (`rotary_s`: the table
  multiplies promote to fp32 under autocast and run at the `broadcast_mul` kind's 1.2 TB/s;
  64 ms of llama-1b-gqa mb4's step, 62 priced). Checked against H200 profiles by kind of
  kernel (`python bench/truth/op_categories.py`), with attention on the rows of the kernels
  SDPA runs (bench/update_profile.py; bench/truth/README.md, sixteenth pass).
- GPU idle (`gpu_idle_s`): between the kernels of an eager step the GPU waits for its CPU's
  next launch beyond the profile's back-to-back gap, in proportion to the blocks and not to
  their tokens. GPU_IDLE_S_PER_BLOCK is measured, not fitted to the step: the profiled step's
  time with no kernel running, less what the profiler added to the step, per block and
  microbatch, median over the device-bound GPT single and ddp rows (0.121 ms; `predict.py
  --fit`; the Llama rows, held out, measure 0.178; a pipeline's idle holds its bubble). Fitted to the steps' residual
  instead it would come out at 0.10-0.60 ms, growing with the tokens per block: work the
  model misses, not idle. It is in every eager stage's per-layer terms, the planner's too.
- DDP's gradient buckets: DistributedDataParallel copies every fp32 gradient into its
  all-reduce bucket (read 4, write 4 B per parameter; the ddp rows' "other" bucket, 2.5 ms per
  billion parameters, is 8.7 B per parameter at the AdamW bandwidth).
- host dispatch: eager PyTorch launches every op from Python; a step whose GPU work is short
  waits on the CPU. A linear (autocast casts, matmul, bias, and in backward two matmuls, the
  grad cast and accumulation) costs HOST_S_PER_LINEAR fitted on host-bound GPT rows; every
  other op the profile's eager launch overhead forward and again backward. DTensor tensor
  parallelism, FSDP2 and DDP add per-block host costs, fitted on the GPT rows whose GPU work
  (busy time less exposed NCCL time, which on a host-bound step is waiting for the other rank)
  leaves a tenth of the step idle. DDP's (its reducer's autograd hook per parameter, the copy
  of each gradient into its bucket, an all-reduce launch per 25 MB bucket) shows in
  ddp-gpt-1.3b mb1: 90.5 ms measured, host-bound, against 51.1 ms for the same model and
  microbatch on one GPU: 1.46 ms per block; without it the row was predicted at 63 ms (-30%).
  It is paid in every microbatch of an accumulated step, the ones under `no_sync` too (where
  DDP prepares no backward and its reducer's hooks return at once: the cost is not the
  reducer's alone, not isolated): in bench/results/truth_h200_accum_2026-11-30.json, same
  recipe, ddp-gpt-1.3b mb1 nmb4 takes 409.2 ms against single nmb4's 280.8, 1.34 ms per block
  and microbatch, and nmb2 213.4 ms against half of that, 1.52; counted once per step those
  rows were predicted -20..-37% (-9..-16% per microbatch).
  FSDP2's comes in two parts: HOST_FSDP_S_PER_BLOCK in every microbatch (its hooks: gathers,
  reshards, reduce-scatters, the sharded gradients' update) and HOST_FSDP_STEP_S_PER_BLOCK once
  per step. The one-microbatch fsdp2 rows cannot tell them apart; the accumulated ones can:
  fsdp2-gpt-1.3b mb1 nmb4 (bench/results/truth_h200_accum_2026-11-30.json, host-bound, 651.0
  ms) leaves 4.47 ms per block and microbatch beyond the ops, where the one-microbatch GPT
  rows leave 5.19-6.51 (a step's own 0.72-2.04 ms per block beyond the microbatch's, median
  1.61; the two sum to the 6.08 ms the one-microbatch rows were fitted to, so they do not
  move). Part of that step's cost is the optimizer over FSDP2's DTensor parameters: its host
  bucket in the profiles of those rows is 16.4-21.8 ms against 2.6-7.2 for the same models on
  one GPU (the profiler slows these hosts 1.26-1.45x); the rest is not isolated. autopar run's
  ZeRO-3 without autocast, held out, says the same per microbatch: gpt-1.3b zero3 mb1 and mb8 on
  2 H200s (two microbatches, bench/results/runtime_vs_native_h200.json) leave 4.28-4.40 ms per
  block; they were predicted +25.2 / +27.4 / +28.0% (mb1, mb8, mb8 compiled) with the whole
  one-microbatch figure in every microbatch, +13.2 / +15.1 / +16.0% so (the nmb4 fit row
  +23.7% -> +5.9%). llama-1b-gqa zero3 there (16 blocks) moves +3.0% -> -6.3%: its blocks leave
  5.8 ms per microbatch, more than GPT's, not isolated.
  ZeRO-1/2 run on FSDP2 as well (`fsdp_zero12`): their blocks pay FSDP2's hooks, not DDP's
  reducer, and a dp-vocab head (split over the vocabulary on the dp axis, outside the blocks)
  adds no DTensor cost per block: llama-1b-gqa's default plan at mb1 on 2 H200s (ZeRO-1, one
  microbatch) was priced 233 ms with both against 129 measured, 143 ms so. ZeRO-1 accumulating
  over microbatches reduce-scatters only in the last (set_requires_gradient_sync(False) before
  it); in the others FSDP2's per-microbatch part is HOST_FSDP_NO_SYNC_SHARE of its own, the
  measured ratio of a microbatch that gathers without reduce-scattering to one that does both
  (python bench/host_ops.py --recipes all, tiny width, one rank, each beyond the bf16 module's):
  gpt-6.7b's default plan at mb4 (ZeRO-1, 4 microbatches) +25.3% -> +1.0%, gpt-1.3b zero1 mb8
  +22.0 / +34.0% -> +7.0 / +17.9% (eager, compiled) where the whole part came to every microbatch.
  The step takes max(host, device) on one GPU (the host runs ahead across steps). In a
  pipeline each GPU also waits for its own CPU to launch an op, but the CPUs do not wait for
  each other (evaluation/pipeline.py `simulate`).
- FSDP2's collectives (`fsdp_block_comm_s`, breakdown parts `exposed_comm` and
  `comm_overlap`): FSDP2 prefetches the next block's all-gather during the current block's
  compute and runs the reduce-scatters behind the backward, all on one NCCL stream, so a
  block's collectives wait only where its compute does not cover them, plus the first
  block's gather and the last reduce-scatter; the root's (embedding, head) stay exposed. The
  reduce-scatter moves fp32 (reduce_dtype=fp32, FSDP_REDUCE_SCATTER_FACTOR). Against the
  measured NCCL time on the device-bound fsdp2 rows (comm_total_s: gpt-6.7b mb8 122 ms,
  llama-3b mb4 70 ms) the collectives come to 132 / 69 ms with fp32 reduce-scatters (98 / 52
  with bf16), and the exposed part predicted against measured (exposed_comm) is 7.9 / 8.8 ms
  (gpt-6.7b mb4), 7.9 / 4.8 (mb8), 9.2 / 9.4 (llama-3b mb4), 13.2 / 22.5 (llama3-8b mb1),
  6.3 / 6.9 (llama-1b s4096 mb4), where the model had counted all of it (98, 52, 100, 23 ms).
  Hidden is not free: NCCL's kernels share the SMs and HBM with the compute, and FSDP2's
  copy-in / copy-out kernels run beside it (fsdp2-gpt-2.6b mb4's forward GEMMs take 24.3 +
  11.3 ms against 17.3 + 9.1 ms for the same kernels in ddp-gpt-2.6b mb4, whose forward has no
  collective). COMM_OVERLAP_SLOWDOWN, the compute's slowdown per second of hidden collective,
  is fitted on the device-bound GPT fsdp2 rows (gpt-6.7b mb4, mb8: 0.576, 0.553): fsdp2-gpt-6.7b
  mb4 -16.9% with the overlap alone, +0.3% with the slowdown (+5.5% before, all exposed). The
  held-out Llama fsdp2 rows want less (0..0.36): they are +3.0..+9.1% with it.

- pipelines (torch.distributed.pipelining, bench/truth pp rows; `pipeline_*` below): three
  things the per-stage ops do not hold. (a) `scale_grads`: the schedule divides every `.grad`
  by the number of microbatches after its last backward (scale_grads=True, the default), one
  pass over the fp32 gradients (read 4, write 4 B per parameter) in the step's tail: the first
  stage's "other" bucket, 6.9 ms on gpt-6.7b (3.4 B parameters), 1.6 ms on gpt-1.3b, 3.6 ms on
  llama-3b. (b) a tied LM head on another stage than the embedding is a copy there
  (Megatron's embedding group): its own fp32 weight, gradient and Adam state, its casts and
  accumulation every microbatch, its optimizer step, and an all-reduce of the two fp32
  gradients after the schedule (`tied_copy_params`, the evaluator): gpt-6.7b's last stage
  updates 3.40 B parameters by its optimizer time, 0.21 B (the head) more than the model had,
  and its per-microbatch casts are 1.3 ms over the first stage's. (c) the GPU idles in every
  stage's microbatch, neither computing nor waiting in NCCL, in proportion to the stage's
  blocks and not to its tokens: with the measured per-rank kernel times replayed through the
  1F1B schedule (scale and optimizer in the tail) the steps are 27.0 / 27.4 ms longer on
  gpt-6.7b mb1 / mb2 (16 blocks per stage), 17.8 on gpt-1.3b mb4 (12) and 22.2 on llama-3b (14),
  0.19-0.21 ms per block and microbatch. It was a pipeline term while attention was priced on
  rows of a kernel SDPA does not run; with attention and the eager kernels priced by kind it is
  every eager stage's GPU idle (above), measured on the one-stage rows; the rest of the pp
  rows' replay gap was work the model had missed.
  The evaluator adds the per-microbatch times of (b) to the schedule, not to the stages' own
  op times, which the planner's per-layer costs match (they do not know where the stages are
  cut); the candidates the planner simulates are scored with them.

- compiled blocks (`compiled_per_block`, the runtime's rule: `autopar run` compiles the blocks
  of tensor-parallel stages and, per engine (COMPILED_BY_ENGINE), of stages on one device on
  CUDA, not DDP, FSDP2 or context-parallel ones; `evaluate(..., compiled=)` overrides it, False for
  bench/truth's eager harness). The block is one torch.compile'd region; what lies outside it
  (embedding, head, loss, optimizer, casts of the weights and gradients, the allocator) stays
  as above. Four terms change inside it:
  (a) host: one compiled region's call per block and microbatch, HOST_COMPILED_S_PER_BLOCK
  (forward and backward: guards, the wrapper's DTensor unwrapping, Inductor's kernel and
  collective launches, autograd's accumulation of the block's gradients) in place of its ops'
  dispatch and DTensor's per-block cost. Fitted on the compiled GPT rows at microbatch 1 of
  bench/results/runtime_vs_native_h200.json (gpt-1.3b, gpt-6.7b tp2: host-bound, 523 and 699
  ms for 96 and 128 block calls; `python bench/truth/predict_runs.py --fit`): 5.44 ms. The
  gpt-1.3b row is host-bound and varies run to run: 497, 473 and 523 ms in three runs (5.30,
  5.18 and 5.44 ms fitted); the file keeps the latest. The
  profile of gpt-1.3b tp mb1 (bench/results/profiles_h200_2026-11-30/) has 1.64 ms forward and
  2.68 ms backward per region call and 0.54 ms of AccumulateGrad per block, under the profiler
  (559 ms/step profiled against 497 timed): 4.3 ms unprofiled, the same order. It does not
  grow with the block's size (gpt-6.7b's blocks are 4x gpt-1.3b's: 5.4 against 5.2 ms each).
  A block whose weights are not split (one device, DDP, FSDP2) is a plain region, no DTensors
  to wrap and unwrap: HOST_COMPILED_PLAIN_S_PER_BLOCK, fitted the same way on the compiled GPT
  rows at microbatch 1 of bench/results/runtime_vs_native_h200_1gpu.json (gpt-1.3b on one
  H200, the plain module, two runs of one program: 252 and 227 ms for 96 block calls, where
  the model's device time is 115 ms, so the host bounds them): 2.47 ms (2.60 and 2.35); refitted
  2.678 ms on the rows measured again under expandable segments (the constant's comment). It
  holds what the eager model also misses at one sequence on one GPU (the eager rows there are
  -10.8 / -13.1%), not isolated. Held out: llama-1b-gqa mb4 on one H200 is device-bound
  (host 160 ms of a 354 ms predicted step), so it does not test the constant; it is +4.9%
  (337 ms measured; eager -7.6%; +12.0% before (d)).
  (b) device: Inductor fuses autocast's casts into the norm's kernel (and the residual add
  with the norm: `triton_per_fused_add_native_layer_norm` in the profile), which writes the
  bf16 output once; the fp32 residual stream's width stays (COMPILED_NORM_FP32_BYTES_PER_ELEMENT,
  6 B per element against eager's 8 + 6 per linear reading it). gpt-1.3b tp mb8: the
  profiled kernels that fuse the norms (and adds) take 25.6 ms per step (those among the 40
  longest kernels; 30.0 with the fused residual add); the blocks' norms and residual adds are
  priced 36.5 ms per step so (the graph's 19.8 and 16.7 of fp32 width), 75.5 ms at eager's
  bytes.
  (c) memory: autocast's bf16 copies of a norm's output, one per linear reading it, trace to
  identical `_to_copy` nodes that AOTAutograd's CSE merges: one saved copy
  (`autocast_input_copies_bytes`). Peak allocated on the six compiled rows: -3.6..+0.4%
  (+0.6..+10.5% with the eager copies; llama-1b-gqa tp mb4 +10.5%, three copies of q, k, v's
  input and two of w1, w3's). And in a plain region (weights not split), what AOTAutograd's
  partition keeps: the least set from which the backward can replay the rest with pointwise
  ops (costmodel/remat.py; evaluator.compiled_block_stash_delta_bytes), e.g. x + proj rebuilt
  from x and proj, SiLU's output from its input. Measured block by block on one H200
  (bench/truth/saved_activations.py): gpt-1.3b 272 MiB, llama-1b-gqa 504 MiB at 4 x 1024 / 4 x
  2048 tokens, the cut's figures to the byte; the one-GPU compiled rows' allocated is now
  within -0.1..+0.5% (llama-1b-gqa mb4 +7.9% before), reserved max 20.3% -> 12.5%. Not in
  tensor-parallel regions, unmeasured, whose rows' allocated the cut would undercut by up to
  7.6%. A compiled block also casts its linears' weights to bf16 itself and keeps the copies
  per microbatch, where eager autocast caches one per step, so a pipeline stage with k
  microbatches in flight keeps k copies (evaluator.eager_terms moves them from the cache to
  the stash: gpt-1.3b pp mb8 compiled, allocated -5.9% -> -1.6%).
  (d) device: Inductor fuses each chain of the block's pointwise ops (elementwise, norms,
  copies) that no matmul or attention separates into one kernel each way, which reads the
  chain's inputs and writes its outputs once (`fused_pointwise_s`, at the memory-bound price
  of one op; evaluator `fused_pointwise_chains` finds the chains): per Llama block rotary's
  neg / cat / mul / mul / add for q and for k, the residual add with the MLP's RMSNorm, SiLU
  with SwiGLU's mul; per GPT block the residual add with ln2 (its bias and GELU are one op or
  part of the linear in the graph). No constant: the graph's bytes per op, read and written
  once. llama-1b-gqa mb4 on one H200 (bench/results/profiles_h200_1gpu_2026-12-01/): the
  fused SiLU-mul kernel takes 64.2 us forward, 109.1 backward per block and microbatch, the
  model 64.1 / 106.2 (264 / 440 MiB at 4.38 TB/s); the eager elementwise kernels in the top
  of the table (copy_, mul, add_, add, the RMSNorm kernels, cat, silu_backward, neg) take
  174.5 ms per step, the compiled step's triton kernels and remaining add_ / copy_ / sum
  50.5. Priced so, the Llama is +4.9% (+12.0% without), the GPT rows move by 0.4-0.5%.
  Held out (compiled rows not in the fit): llama-1b-gqa tp mb1 / mb4 -24.1 / -16.3% (449 /
  407 ms measured, 347 ms in an earlier run of mb4), gpt-1.3b tp mb8 -11.3%, gpt-6.7b tp mb4
  -15.2%; a compiled dp2 run of gpt-1.3b mb8 (previous_run in that file) +4.8%. What the held-out
  rows lack: the Llama block's host cost per region is higher than GPT's (7.0 ms at mb1, 6.3
  at mb4), not profiled; and tensor parallelism's backward all-reduces each
  column-parallel linear's input gradient apart and in fp32 (4 fp32 all-reduces per GPT block
  in the profile, where the graph has 2 in bf16), eager and compiled alike, not priced yet.

Memory (the peak of one GPU; predicted allocated within -0.9..0% of measured on the GPT
single-GPU rows without recomputation and +0.2..+1.9% on the held-out Llama ones,
bench/truth/predict.py; -2.9..0% and -1.7..+2.3% before the input copies and the 10 B loss):
- the two moments of a one-microbatch step: at the start of the loss backward the activations
  are all live but the fp32 gradients are not (zero_grad(set_to_none=True) freed them; 4 B per
  parameter absent) while autocast's bf16 weight copies, saved for the backward, are (2 B); at
  the end of the backward the gradients are all made and the activations gone. The peak is the
  larger (`gradients_absent_at_activation_peak_bytes`); with several microbatches the
  gradients exist after the first one and the weight cache lives all step.
- the optimizer step is no third moment: fused Adam updates the weights and moments in place,
  so the step holds the state and the gradients, which the end of the backward held too (under
  FSDP2 the sharded fp32 gradients, `zero3_grad_pool_bytes`, with the activations gone). Every
  recipe priced steps fused on CUDA, FSDP2's DTensor parameters included: autopar's engines
  (runtime.optim.make_optimizer), bench/truth's corpus and bench/runtime_vs_native.py's native
  recipes, as torchtitan does. Foreach Adam would add an fp32 temporary the size of the updated
  shard (`_multi_tensor_adam`'s sqrt of the second moment), which came beside FSDP2's
  reduce-scatter output at the step and made the peak of gpt-1.3b ZeRO-3 mb1 on 2 H200s
  (2.45 + 2.45 GiB, bench/results/memory_peaks_h200_2026-12-01_zero3_mb1.txt, when the engines
  still stepped FSDP2's DTensors with foreach).
- autocast's fp32 residual stream: the embedding output and every residual add are fp32 (the
  weights are), so every norm saves an fp32 input and full recomputation keeps fp32 layer
  inputs (`fp32_residual_extra_bytes`): the measured per-token slope of single-gpt-1.3b
  (mb1 -> mb16) is 37.5 B per hidden element per block, 38 with fp32 norm inputs, 34 without.
- cross-entropy: autocast runs `log_softmax` by setting its dtype to fp32, not by casting the
  logits (its fp32_set_opt_dtype policy; `F.cross_entropy` itself has no autocast rule and
  decomposes into log_softmax and nll_loss), so the output is fp32 (4 B per logit, saved) and
  its backward returns the gradient in the input's dtype, bf16. At the log-softmax backward,
  the peak: the saved output (4), the NLL gradient (4) and the logits' gradient (2): 10 B per
  logit element (CROSS_ENTROPY_PEAK_BYTES_PER_LOGIT; the forward's moment, bf16 logits 2 +
  output 4, is lower). Derived so, then checked on the fit rows' slope: single-gpt-1.3b mb8 ->
  mb16 allocates 19.02 GiB more for 8,192 tokens; 19.00 predicted with 10 B and the input
  copies below, 19.78 with 12 B (18.28 before both). The graph's stash also holds the logits
  for the loss (a bf16 stand-in for the saved log-softmax output), which the eager step does
  not keep (the bf16 logits are gone after the forward; `loss_stash_bytes` takes them out).
  Counting both counted 14 B per logit: single-llama-1b rows' allocated +4..+9% (0.31-0.35 GiB
  per 1k tokens over; 2 B x 128256 = 0.24), the fsdp2 Llama rows' +12..+22%.
- autocast's input copies (`autocast_input_copies_bytes`): a norm's output is fp32, and every
  linear that reads it casts it to bf16 and saves its own copy for its weight gradient (the
  autocast cache holds only the weights' casts), where the graph saves one tensor: 2 B per
  element for each consumer beyond the first. Counted from the zoo's code, a GPT block under
  autocast on fp32 weights saves 40 B per hidden element and token (fp32 norm inputs 4 + 4,
  three bf16 copies of ln1's output 6, q, k, v 6, the attention output 2, ln2's copy 2, fc1's
  output and GELU's 8 + 8), 36 without the copies; a Llama block's three extra copies (wq, wk,
  wv; w1, w3) are 96 of the 108 MiB per block and 8,192 tokens that autopar's llama-1b-gqa
  steps held beyond the model (bench/results/memory_peaks_h200_2026-11-30.txt).
- a tied embedding: at the end of the backward the embedding's dense fp32 gradient exists next
  to the `.grad` the LM head made, until it is added in (4 B per embedding parameter).
- DDP: its buckets hold a second fp32 copy of every gradient (4 B per parameter, all step;
  native DDP's gradient_as_bucket_view is off by default: `.grad` and the buckets apart). And
  one transient (`ddp_rebuild_transient_bytes`, 4 B per parameter): the first step's buckets
  (one bucket of every parameter: find_unused_parameters off) are rebuilt in the second step's
  forward (`Reducer._rebuild_buckets`, in DDP's `_pre_forward`), and the first ones live on
  beside the new ones through that forward's activation peak: the first step's all-reduce
  stashed its bucket (ProcessGroupNCCL keeps an async collective's tensors until its watchdog
  has seen it complete, and then releases them at the next collective call), so unless the
  watchdog saw the first step's all-reduce finish before the rebuild (the rebuild's own
  broadcast then releases them and the reducer frees them at once), they go at the second
  step's first gradient all-reduce, in its backward. Whether the watchdog was first is a race:
  a loop that runs its steps back to back usually enqueues step 2's forward before it, and
  the run's peak is then step 2's, 4 B per parameter over the steps after it
  (bench/truth/ddp_memory.py, bench/results/ddp_memory_h200_2026-12-01.txt: the first buckets
  are freed by the rebuild itself after a sync and a 1 s pause; back to back, gpt-1.3b mb1 /
  mb4 and gpt-2.6b mb4 peak at 31.56 / 39.22 / 74.12 GB in step 2 and 26.81 / 33.96 / 63.52 GB
  after it; in a second call, ddp_memory_h200_2026-12-01b.txt, back-to-back gpt-1.3b mb1 and
  gpt-6.7b mb1 had no transient, and autopar's bucket-view DDP had it on gpt-1.3b, 31.56 GB,
  and not on gpt-6.7b, 126.15 GB). A plan cannot count on losing the race, so it is counted at the activation peak, not at the end of the
  backward (gone by then in every measured step); a plan that fits must fit step 2. The
  corpus's harness syncs after the first step, so its ddp rows have the transient or not,
  by the race (ranks of one row differ: ddp-llama-3b mb1/mb2; bench/truth/predict.py compares
  them both ways, `evaluate(..., ddp_rebuild=False)`). `autopar run`'s DDP
  (gradient_as_bucket_view=True: `.grad` is a view of the bucket) has the same peak at the
  activation moment (with one microbatch its bucket holds the gradients where native DDP's
  `.grad` are absent; with several, both keep the first microbatches' `.grad`, made under
  no_sync, beside the bucket) and 4 B per parameter less at the end of the backward (its
  `.grad` are the bucket's views), which this counts as native DDP's (on the safe side).
- ZeRO as `autopar run` runs it (`fsdp_bf16_params`, the default recipe): FSDP2 with
  MixedPrecisionPolicy's bf16 parameters and no autocast, where the corpus's fsdp2 rows ran
  autocast on top of those bf16 parameters (`autocast_over_bf16_params`, `zero_autocast=True`,
  which bench/truth/predict.py passes so those rows stay priced as they ran: a bf16 residual
  stream, LayerNorm in fp32 by autocast's rule and RMSNorm in bf16 on torch 2.11,
  `norm_runs_fp32`; autocast's fp32 loss; no weight cache). Without autocast the blocks and the loss are
  bf16 as the graph counts them: no fp32 residual stream, input copies or weight cache (memory
  and time), and the loss at BF16_CROSS_ENTROPY_PEAK_BYTES_PER_LOGIT (6 B) and
  BF16_CROSS_ENTROPY_BYTES_PER_LOGIT (12 B) per logit, or loss_parallel's fp32 intermediates
  for a vocab-split head (`cross_entropy_peak_bytes_per_logit`, 16 B; a dp-vocab head's weight
  shard, which FSDP2 ignores, is cast to bf16 every forward, 2 B per shard parameter).
  ZeRO-1/2 (`fsdp_zero12`, `fsdp_zero12_state_bytes`): 16 B per sharded parameter and 2 B of
  unsharded bf16 weights, no DDP buckets; ZeRO-1 over several microbatches also 4 B per local
  parameter of unsharded fp32 gradients in place of the sharded ones (it reduce-scatters once
  per step, runtime/engines.py `_fsdp_accumulation`); the sharded fp32 gradients are absent at
  a one-microbatch activation peak and live in FSDP2's gradient pool (`zero3_grad_pool_bytes`).
  `python bench/truth/predict_runs.py`: memory median 19.5% -> 11.4%, max 45.6% -> 28.4% over
  the eager rows; gpt-1.3b zero3 mb1 is 4.0% short, its reserve 21.5% of its allocated (native
  FSDP2's 22.4%) against the envelope's 14.8%.
- FSDP2: the root module's unsharded bf16 weights and their gradients (4 B per root parameter,
  gathered for the forward and kept to the end of the backward), and one block's backward
  buffers plus the next block's prefetch (16 B per parameter of the largest block,
  `fsdp_buffer_bytes`): with them the gpt-6.7b fsdp2 rows are predicted within -2.3..+2.9%.
- autocast's weight cache: one autocast region around several microbatches (a pipeline's
  schedule step) keeps the bf16 copy of every weight for the whole step (2 B per parameter).
- cuBLAS and cuBLASLt workspaces: 32 MiB each on Hopper, allocated through the caching
  allocator.
- caching allocator: peak reserved exceeds peak allocated by up to RESERVE_FRACTION (envelope
  of (reserved - allocated) / allocated over every corpus row without recomputation but the
  fsdp2 ones; the largest is single-llama3-8b-s2048-mb1, 0.148, at the GPU's capacity with one
  allocator retry), and by at least one fp32 logits tensor (`loss_segment_bytes`,
  `reserved_bytes`: a step's largest allocation, for which the allocator can need a segment of
  its own after the optimizer's state took part of the one it had; single-llama-1b s8192 mb4
  with full recomputation reserves exactly one, 15.66 GiB, over its allocated, where the
  fraction gives 9.0 GiB). The planner's cap per stage (`stage_allocatable_bytes`) holds both.
  That envelope is the default segments'. `autopar run` runs with expandable segments
  (ALLOC_CONF, where the user set no allocator configuration), under which the same rows reserve
  far less (RESERVE_FRACTION_EXPANDABLE, 0.070; every function here takes `expandable`, True for
  `autopar run`'s allocator; bench/truth's native rows ran with the default segments). The loss
  segment is kept as the default segments measured it (the rows with recomputation reserve
  1.117-1.163x with expandable segments, under the loss segment's bound).
- FSDP2's gradient pool (`zero3_grad_pool_bytes`): the caching allocator keeps one pool per
  stream, and FSDP2's reduce-scatter allocates the sharded fp32 gradients on its own stream. At
  a one-microbatch step's activation peak they are absent (zero_grad(set_to_none=True)) but
  their memory stays reserved in that pool, where the compute stream cannot use it; at the end
  of the backward they are back while the activations' memory stays reserved in the compute
  stream's pool. So reserved = (peak of the compute stream's pool) x (1 + RESERVE_FRACTION) +
  the gradients (4 B per sharded parameter). The fsdp2 rows, none of which the constant is
  fitted on: reserved +3.6..+17.4% (the Llama ones highest, where their allocated is over),
  against +24..+58% with the envelope fraction 0.550 of one row that it replaced. That row,
  fsdp2-gpt-1.3b-s1024-mb1 (rank 1 16.5 GiB reserved at 10.6 GiB allocated), started with the
  previous run's segments still reserved (reserved_bytes_at_start 19.7 / 13.6 GiB, every other
  row 0.45 GiB or less; its rank 1 ends with 11.1 GiB of inactive split blocks, rank 0 3.0), so
  its reserved peak is not compared (bench/truth/predict.py, `contaminated`).
- outside the allocator: the CUDA context (0.77 GiB measured on every GPU) and NCCL's
  communicators and buffers (0.8-1.25 GiB measured with 2 GPUs: ddp/fsdp2 0.82, tp 0.94-1.19,
  pp 1.25).
"""

from __future__ import annotations

import numpy as np

# The compute's slowdown beside hidden collectives is shared with the data-parallel gradient sync,
# so it lives with the collectives (fitted here, on the fsdp2 rows: see the docstring).
from ..hardware.mesh import MeshAxis
from .collectives import ALL_REDUCE, collective_s
from .collectives import COMM_OVERLAP_SLOWDOWN as COMM_OVERLAP_SLOWDOWN
from .collectives import comm_overlap_s as comm_overlap_s
from .compute import ComputeModel

GIB = 2**30

# -- time -------------------------------------------------------------------------------------
ADAMW_BYTES_PER_PARAM = 28
ADAMW_BYTES_PER_S_H200 = 3.47e12          # fitted: optimizer bucket, GPT single/ddp rows (median)
STREAM_BYTES_PER_S_H200 = 4.384e12        # the H200 profile's streaming `add` bandwidth
ADAMW_STREAM_SHARE = ADAMW_BYTES_PER_S_H200 / STREAM_BYTES_PER_S_H200

CROSS_ENTROPY_BYTES_PER_LOGIT = 36        # fp32 upcast, log-softmax, their backward (see doc)
# bf16 logits without autocast: log-softmax (read 2, write 2), the NLL gradient (2), the
# log-softmax gradient (read output 2 and gradient 2, write 2)
BF16_CROSS_ENTROPY_BYTES_PER_LOGIT = 12
AUTOCAST_BACKWARD_FACTOR = 2             # backward bytes per forward byte of a compiled norm's fp32 traffic
WEIGHT_CAST_BYTES_PER_PARAM = 6           # fp32 weight -> bf16 copy, once per step
GRAD_CAST_BYTES_PER_PARAM = 6             # bf16 grad -> fp32 .grad (first microbatch)
GRAD_ACCUMULATE_BYTES_PER_PARAM = 18      # cast + .grad += (every later microbatch)

DDP_BUCKET_COPY_BYTES_PER_PARAM = 8

HOST_S_PER_LINEAR = 3.60e-4               # fitted: host-bound GPT single-GPU rows (fwd + bwd)
HOST_FORWARD_SHARE = 0.212                 # fitted: profiled host time, blocks fwd / (fwd + bwd), median
HOST_TP_S_PER_BLOCK = 1.025e-2            # fitted: GPT tp2 rows, DTensor dispatch per block
HOST_FSDP_S_PER_BLOCK = 4.47e-3            # fitted: GPT fsdp2 accumulation row, FSDP2 per block and microbatch
HOST_FSDP_STEP_S_PER_BLOCK = 1.61e-3       # fitted: GPT fsdp2 rows, FSDP2 per block once per step beyond it
# measured: FSDP2's host per block in a microbatch that gathers but does not reduce-scatter (ZeRO-1
# accumulating, set_requires_gradient_sync(False)) over one that does both (ZeRO-3), each beyond the
# bf16 module's; tiny-width sweeps, bench/results/host_ops_recipes_h200_2026-12-01.json: GPT 0.587,
# 0.615, Llama 0.558, 0.581 (two runs; median)
HOST_FSDP_NO_SYNC_SHARE = 0.584
HOST_DDP_S_PER_BLOCK = 1.46e-3             # fitted: GPT ddp rows, DDP's reducer hooks and bucket launches per block
# fitted: compiled tensor-parallel GPT rows at microbatch 1 of bench/results/runtime_vs_native_h200.json
# (`python bench/truth/predict_runs.py --fit`), host seconds per compiled block and microbatch
HOST_COMPILED_S_PER_BLOCK = 5.438e-3
# fitted: compiled plain (non-DTensor: weights not split) GPT rows at microbatch 1 of
# bench/results/runtime_vs_native_h200_1gpu.json (`python bench/truth/predict_runs.py --fit`),
# host seconds per compiled block and microbatch where the region's inputs are plain tensors; its
# two fit rows (gpt-1.3b dp and zero3 at mb1, the same plain module on one GPU) measured 237.5 and
# 280.4 ms in 3 fresh rounds each (2.45 and 2.90 ms implied): host-bound steps are that noisy there
HOST_COMPILED_PLAIN_S_PER_BLOCK = 2.678e-3
# inside a compiled block, per element of a norm's output: the norm reads its fp32 input (+2 B over
# the graph's bf16) and the residual add reads and writes fp32 (+2, +2); the casts are fused away
COMPILED_NORM_FP32_BYTES_PER_ELEMENT = 6

# FSDP2 (MixedPrecisionPolicy(reduce_dtype=fp32)) reduce-scatters fp32 gradients where the graph's
# collectives move the training dtype's (bf16): twice the bytes.
FSDP_REDUCE_SCATTER_FACTOR = 2.0

# torch.distributed.pipelining's scale_grads: .grad /= n_microbatches after the schedule (read 4, write 4 B)
PIPELINE_GRAD_SCALE_BYTES_PER_PARAM = 8
# measured: GPU idle per block and microbatch (device-bound GPT single and ddp rows' profiles, `predict.py --fit`)
GPU_IDLE_S_PER_BLOCK = 1.21e-4

# -- memory -----------------------------------------------------------------------------------
CROSS_ENTROPY_PEAK_BYTES_PER_LOGIT = 10   # fp32 log-softmax output 4 + its fp32 gradient 4 + bf16 logits' gradient 2
BF16_CROSS_ENTROPY_PEAK_BYTES_PER_LOGIT = 6  # bf16 log-softmax output 2 + NLL gradient 2 + logits' gradient 2
LOSS_PARALLEL_BF16_PEAK_BYTES_PER_LOGIT = 16  # bf16 logits 2, fp32 copy 4, shifted 4, fp32 result 4, bf16 result 2
FP32_BYTES = 4                            # autocast's residual stream, saved by every norm
AUTOCAST_DTYPE_BYTES = 2                  # bf16: what autocast casts a linear's input to
DDP_BUCKET_BYTES_PER_PARAM = 4           # fp32 gradient buckets, all step (and the first ones again in step 2)
AUTOCAST_CACHE_BYTES_PER_PARAM = 2       # also autocast's bf16 weight copies saved for backward
TIED_EMBEDDING_GRAD_BYTES_PER_PARAM = 4   # embedding backward's fp32 gradient, before it is added into .grad
FSDP_ROOT_BYTES_PER_PARAM = 4            # root's unsharded bf16 weights + their bf16 gradients
FSDP_BLOCK_BYTES_PER_PARAM = 16          # one block's backward buffers and the next one's prefetch
# fitted envelope of (reserved - allocated) / allocated over every row without recomputation
# but the fsdp2 ones (both families; contaminated rows of bench/truth/predict.py left out), with
# the caching allocator's default segments, as bench/truth's native recipes ran
RESERVE_FRACTION = 0.148
# the same envelope with expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True), as
# `autopar run` runs (ALLOC_CONF): the native corpus's one-GPU rows without recomputation reserve
# 1.005-1.070x their allocated (single-llama-1b-s8192-mb4 the most, 121.8 / 113.8 GiB), autopar
# run's 30 one-GPU rows 1.005-1.042x (bench/results/allocator_expandable_h200_2026-12-01.json). A
# step capped below what it reserves uncapped still runs but retries its allocations and slows
# by 10-16% there, so the envelope of the uncapped reserves is the cap at which none retries.
RESERVE_FRACTION_EXPANDABLE = 0.070
# What `autopar run` sets where the user has set no allocator configuration (runtime.launch): with
# it the allocator maps one growing segment per stream instead of caching fixed segments, so it
# reserves less beyond the allocated (torchtitan's launcher sets the same).
ALLOC_CONF = "expandable_segments:True"
CUBLAS_WORKSPACE_BYTES = 2 * 32 * 2**20   # cuBLAS + cuBLASLt workspaces (32 MiB each on Hopper), in the allocator
CUDA_CONTEXT_BYTES = 0.77 * GIB
NCCL_BYTES = 1.25 * GIB


# The norms torch's CUDA autocast runs in fp32 (its fp32 cast policy, AT_FORALL_FP32 in
# aten/src/ATen/autocast_mode.h) in torch 2.11, the torch bench/truth's corpus ran on: layer_norm
# and group_norm. rms_norm has no autocast rule there and runs in its input's dtype; torch 2.12
# put it on the fp32 policy (pytorch/pytorch#174824; torch 2.13 lists it).
AUTOCAST_FP32_NORM_OPS = frozenset({"layer_norm", "group_norm"})


def fsdp_bf16_params(zero: int, dp_sharded: bool, zero_autocast: bool = False) -> bool:
    """Whether a ZeRO stage runs as `autopar run` runs it (runtime/engines.py): FSDP2 with
    MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) and no autocast, where the
    data-parallel degree shards (`dp_sharded`). Everything the blocks and the loss compute is
    then bf16, as the graph counts it: no fp32 residual stream, no per-linear input copies, no
    autocast weight cache, a bf16 loss (`cross_entropy_peak_bytes_per_logit`). `zero_autocast`
    is the other recipe, the one bench/truth's fsdp2 rows ran: the same bf16 parameters with
    autocast on top (`autocast_over_bf16_params`; ZeRO-1/2 as DDP under autocast); those rows
    are priced as they ran."""
    return zero >= 1 and dp_sharded and not zero_autocast


def autocast_over_bf16_params(zero: int, dp_sharded: bool, zero_autocast: bool = False) -> bool:
    """Whether a ZeRO-3 stage runs bench/truth's fsdp2 recipe (`zero_autocast`; truth.py
    setup_fsdp2): FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), where
    the data-parallel degree shards, and autocast on top. Against autocast over fp32 weights
    (the single, DDP, TP and PP rows): the weights the blocks see are bf16, so autocast's weight
    casts are no-ops and it caches nothing (its cache takes only fp32 leaves: no
    `state_bytes` weight cache over several microbatches); the embedding's output, and so the
    residual stream, is bf16 (no fp32 layer inputs under recomputation); a norm runs in fp32
    only where autocast casts it (`norm_runs_fp32`); the loss is autocast's, fp32 log-softmax
    (log_softmax's fp32_set_opt_dtype policy holds whatever the logits' dtype)."""
    return zero_autocast and zero >= 3 and dp_sharded


def norm_runs_fp32(norm_op: str, bf16_stream: bool) -> bool:
    """Whether a norm (`norm_op`: the graph's op, "layer_norm", "rms_norm", ...) runs in fp32
    under autocast: it then saves an fp32 input (`fp32_residual_extra_bytes`) and its fp32
    output is cast by every linear it feeds (`autocast_input_copies_bytes`,
    `autocast_norm_s`). Over fp32 weights the residual stream is fp32 and every norm
    runs in fp32; over bf16 ones (`bf16_stream`: `autocast_over_bf16_params`) only those
    autocast casts to fp32 (AUTOCAST_FP32_NORM_OPS): a LayerNorm casts its bf16 input to fp32
    and saves that copy, as the fp32 stream's norm saves its input; an RMSNorm on torch 2.11
    runs bf16 in and out and saves its bf16 input, the graph's count. The fsdp2 Llama rows
    measure it: 10 B per hidden element and token per block (2 x 2 B fp32 inputs, 2 + 1 extra
    input copies of 2 B) over the measured slope, 16.33 against 19.62 GiB per microbatch of
    llama-3b s4096 before (16.31 now)."""
    return not bf16_stream or norm_op in AUTOCAST_FP32_NORM_OPS


def fsdp_zero12(zero: int, dp_sharded: bool, zero_autocast: bool = False) -> bool:
    """Whether a stage's ZeRO-1/2 runs as `autopar run` runs it: FSDP2 with bf16 parameters
    (`fsdp_bf16_params`), not DDP, the weights gathered once per step (reshard_after_forward=
    False, and no resharding between microbatches: EngineModel._fsdp_accumulation). No
    bench/truth row runs ZeRO-1/2; `autopar run`'s do."""
    return 1 <= zero <= 2 and fsdp_bf16_params(zero, dp_sharded, zero_autocast)


def fsdp_zero12_state_bytes(local_params: float, sharded_params: float, zero: int = 2,
                            n_microbatches: int = 1) -> float:
    """Weights, gradients and Adam state per GPU under FSDP2's ZeRO-1/2 (`fsdp_zero12`): the
    sharded fp32 weights, gradients and moments, 16 B per sharded parameter, and the unsharded
    bf16 weights gathered for the first forward and kept to the last backward, 2 B per local
    parameter (a block's bf16 gradients last only until their reduce-scatter). No DDP buckets,
    no autocast cache (the bf16 weights are the ones the blocks compute with). gpt-1.3b dp2
    zero1 mb8 x2: 12.27 GiB of its 26.75 GiB allocated (bench/results/runtime_vs_native_h200.json,
    measured when ZeRO-1 still reduce-scattered every microbatch).
    ZeRO-1 over several microbatches accumulates the gradients unsharded and reduce-scatters
    them once, after the last backward (set_requires_gradient_sync(False) before it): from the
    first microbatch's backward on, FSDP2 holds them in its reduce dtype, fp32 (4 B per local
    parameter), besides the 16 B per sharded parameter. Of those, the sharded fp32 gradients
    (4 B) exist only after the step's one reduce-scatter, when the unsharded ones are gone:
    absent at the activation peak (`gradients_absent_at_activation_peak_bytes`), but reserved
    all step in FSDP2's gradient pool (`zero3_grad_pool_bytes`), apart from the compute
    stream's pool that holds the unsharded ones. gpt-6.7b's default plan at mb4 on 2 H200s
    (ZeRO-1, 4 microbatches): 98.3 GiB reserved = the compute pool's 85.8 GiB at 83.2 GiB
    allocated (1.03x) + the 12.5 GiB gradient pool; the model counted the pool inside the
    compute pool there and came out 5.5% short. Allocating the unsharded gradients all at once
    instead of FSDP2's tensor by tensor does not change that reserve beyond noise
    (`python bench/truth/fsdp_accumulation.py`, one H200: 1.03 -> 1.03-1.04x on gpt-6.7b with 16
    layers, 1.12 -> 1.04x on gpt-2.6b; bench/results/fsdp_accumulation_h200_2026-12-01.jsonl).
    ZeRO-2 reduce-scatters every microbatch into the sharded gradients."""
    state = AUTOCAST_DTYPE_BYTES * local_params + 4 * FP32_BYTES * sharded_params
    if zero == 1 and n_microbatches > 1:
        state += FP32_BYTES * local_params
    return state


def cross_entropy_peak_bytes_per_logit(bf16_params: bool, vocab_split: bool) -> float:
    """The loss's working set per logit element at its peak. Under autocast:
    CROSS_ENTROPY_PEAK_BYTES_PER_LOGIT. With FSDP2's bf16 parameters and no autocast
    (`fsdp_bf16_params`) `F.cross_entropy` runs on the bf16 logits in bf16: the saved
    log-softmax output 2, the NLL gradient 2, the logits' gradient 2 (the snapshot of gpt-1.3b
    auto mb32 under FSDP2 held 3 x 1.56 GiB there, bench/truth/README.md sixth pass). A
    vocab-split loss on bf16 logits runs torch's loss_parallel (EngineModel._contexts), whose
    log-softmax computes in fp32 (torch/distributed/tensor/parallel/loss.py `_log_softmax`:
    the computation dtype of bf16 is fp32) and peaks in its forward: the bf16 logits 2, their
    fp32 copy 4, the shifted logits 4, the fp32 result 4 and its bf16 cast 2
    (LOSS_PARALLEL_BF16_PEAK_BYTES_PER_LOGIT; its backward holds less: the saved output 2, a
    zero-filled gradient 2, exp 2, their sum 2 and product 2). The autocast recipe's
    vocab-split losses keep the autocast count."""
    if bf16_params:
        return LOSS_PARALLEL_BF16_PEAK_BYTES_PER_LOGIT if vocab_split else BF16_CROSS_ENTROPY_PEAK_BYTES_PER_LOGIT
    return CROSS_ENTROPY_PEAK_BYTES_PER_LOGIT


def optimizer_s(updated_params: float, cm: ComputeModel) -> float:
    """Fused AdamW over `updated_params` parameters (those this GPU updates)."""
    if updated_params <= 0:
        return 0.0
    return ADAMW_BYTES_PER_PARAM * updated_params / (cm.stream_bytes_per_s * ADAMW_STREAM_SHARE)


def cross_entropy_s(logits: float, cm: ComputeModel, bf16: bool = False) -> float:
    """Cross-entropy, forward and backward, over `logits` elements on this GPU: in fp32 under
    autocast, or in bf16 on bf16 logits (`bf16`: FSDP2's bf16 parameters without autocast)."""
    per_logit = BF16_CROSS_ENTROPY_BYTES_PER_LOGIT if bf16 else CROSS_ENTROPY_BYTES_PER_LOGIT
    return cm.memory_bound_s(per_logit * logits) if logits > 0 else 0.0


def precision_casts_s(local_params: float, n_microbatches: int, cm: ComputeModel,
                      weight_cast_params: float | None = None) -> float:
    """Per microbatch, on average: the bf16 copies of the fp32 weights, the fp32 cast of the
    weight gradients, and their accumulation into `.grad` after the first microbatch.
    `weight_cast_params`: the fp32 parameters cast to bf16 in a step. None: autocast's copy of
    every local parameter, once per step (its cache keeps it across the microbatches). Over
    FSDP2's bf16 parameters (`fsdp_bf16_params`, `autocast_over_bf16_params`) autocast's casts
    are no-ops or absent, and FSDP2 casts the fp32 shards instead (`fsdp_weight_cast_params`);
    the bf16 gradients are cast to fp32 all the same, by FSDP2's reduce-scatter
    (reduce_dtype=fp32) instead of autograd."""
    if local_params <= 0:
        return 0.0
    b = max(1, n_microbatches)
    cast = local_params if weight_cast_params is None else weight_cast_params
    per_param = (GRAD_CAST_BYTES_PER_PARAM + GRAD_ACCUMULATE_BYTES_PER_PARAM * (b - 1)) / b
    weight_bytes = WEIGHT_CAST_BYTES_PER_PARAM * cast / b
    return (per_param * local_params + weight_bytes) / (cm.stream_bytes_per_s * ADAMW_STREAM_SHARE)


def recompute_weight_casts_s(local_params: float, cm: ComputeModel) -> float:
    """Per microbatch: autocast's bf16 copies of a recomputed block's fp32 weights, made again.
    torch's checkpoint reruns the block under a fresh autocast region, whose weight cache starts
    empty, so every linear's weight (and bias) is cast again, the last linear's too: autocast
    casts before autograd records the op, where the early stop would cut the linear
    (`python bench/recompute_kernels.py --which`: a GPT block's 12 weight and bias casts rerun,
    on an H200 and on the CPU). Read 4, write 2 B per parameter, at precision_casts_s's rate."""
    if local_params <= 0:
        return 0.0
    return WEIGHT_CAST_BYTES_PER_PARAM * local_params / (cm.stream_bytes_per_s * ADAMW_STREAM_SHARE)


def fsdp_weight_cast_params(sharded_params: float, zero: int, n_microbatches: int) -> float:
    """The fp32 parameters FSDP2 casts to bf16 in a step (MixedPrecisionPolicy(param_dtype=bf16)):
    every all-gather casts this GPU's fp32 shard (`sharded_params`) into its bf16 input on the
    copy-in stream (torch's FSDPParam.all_gather_inputs, `_to_dtype_if_needed`, each unshard;
    nothing caches it), read 4, write 2 B per shard parameter. ZeRO-3 gathers every unit for
    each microbatch's forward and again for its backward (reshard_after_forward=True; autopar
    run keeps its last block gathered, counted here as resharded), ZeRO-1/2 (`fsdp_zero12`)
    once per step. On dp2 ZeRO-3 with one microbatch (bench/truth's fsdp2 rows) this is the
    byte count of autocast's copy of every local parameter, which the model charged there
    before: COMM_OVERLAP_SLOWDOWN was fitted with it, and DDP's rows, which have no such cast,
    imply the same slowdown (bench/calibration/FINDINGS.md: 0.55-0.58 against 0.565)."""
    gathers = 2 * max(1, n_microbatches) if zero >= 3 else 1
    return sharded_params * gathers


def tp_input_grad_all_reduce_s(graph_nbytes: float, elem_bytes: float, fp32_input: bool, axis: MeshAxis) -> float:
    """One column-parallel linear's backward all-reduce of its input gradient as DTensor's
    tensor parallelism runs it (parallelize_module's ColwiseParallel, eager or compiled per
    block): each linear's input hook makes its own replicated DTensor of the input, so each
    all-reduces its own partial gradient, where the graph's count (Megatron's fused QKV, its
    readers' partial gradients summed before one all-reduce: sharding/stage_problem._grad_share)
    has one per tensor. And under autocast the input is an fp32 norm's output (`norm_runs_fp32`):
    the linear casts it to bf16 inside the hook's DTensor, so the gradient reaching the hook, and
    its all-reduce, is fp32 (`fp32_input`). `graph_nbytes`: the all-reduce's bytes as the graph
    counts them, in elements of `elem_bytes`. The H200 profiles of gpt-1.3b and llama-1b-gqa tp2
    (bench/results/profiles_h200_2026-11-30/, profiles_h200_2026-12-01_tp/, compiled, native
    and autopar alike) have per block and microbatch 4 (GPT: q, k, v, fc1) and 5 (Llama: wq, wk,
    wv, w1, w3) fp32 all-reduces, one per column-parallel linear, and 2 bf16 ones, the
    row-parallel outputs."""
    nbytes = graph_nbytes * (FP32_BYTES / elem_bytes if fp32_input else 1.0)
    return collective_s(ALL_REDUCE, nbytes, axis)


# The engines a stage without tensor parallelism runs its blocks on in `autopar run`
# (runtime/engines.py EngineModel picks them; `stage_engine` names them for this rule), and
# whether each compiles its blocks per block by default on CUDA. Measured both ways on 2 H200s
# (bench/results/runtime_vs_native_h200.json, rows with compile true and false; `python
# bench/runtime_vs_native.py --compile-mode both`) and on one (runtime_vs_native_h200_1gpu.json):
# - "plain", the module on one device: a plan on one GPU (1.07-1.31x, 1-3 GiB less allocated)
#   and a pipeline's stage on one GPU (1F1B gpt-1.3b mb8: 391 -> 351 ms, 27.6 -> 26.3 GiB);
# - "ddp": at 8 sequences faster compiled in three runs (gpt-1.3b dp2 mb8 325 -> 313 ms, 50.9 ->
#   45.3 GiB; 317 -> 300 ms, 50.9 -> 50.2 GiB; an older runtime 318 -> 311 ms), but at one
#   sequence, where the host bounds the step, slower: 141 -> 170 ms (native 108 -> 203 ms), so
#   DDP stays eager by default;
# - "fsdp2" (ZeRO-1/2/3 over several ranks): ZeRO-3 gpt-1.3b mb8 316 -> 321 ms, gpt-6.7b mb4
#   799 -> 791 ms, memory equal: no gain beyond noise, and ZeRO-1/2 not measured compiled;
# - "context_parallel": not measured compiled, nor checked (torch's context_parallel runs on
#   CUDA only, so the gloo tests of tests/integration/test_engines_compiled.py cannot take it).
# Tensor-parallel stages compile whatever their engine (eager DTensor dispatch is host-bound).
COMPILED_BY_ENGINE = {"plain": True, "ddp": False, "fsdp2": False, "context_parallel": False}


def stage_engine(stage_devices: int, fsdp2: bool = False, context_parallel: bool = False) -> str:
    """The engine kind (a key of COMPILED_BY_ENGINE) of a stage without tensor parallelism on
    `stage_devices` devices: FSDP2 where its ZeRO level shards over several ranks (`fsdp2`:
    the runtime's `stage_zero`, the model's `fsdp_bf16_params`), torch's context parallelism
    where its blocks split the sequence (`context_parallel`), DDP over several devices
    otherwise (or a mixed pipeline's own all-reduce, the same replicated blocks), the plain
    module on one."""
    if fsdp2:
        return "fsdp2"
    if context_parallel:
        return "context_parallel"
    return "ddp" if stage_devices > 1 else "plain"


def compiled_per_block(tp: int, on_gpu: bool = True, stage_devices: int = 1, fsdp2: bool = False,
                       context_parallel: bool = False) -> bool:
    """Whether `autopar run` runs a stage's transformer blocks compiled (torch.compile per block),
    for a stage whose blocks' weights are split over `tp` devices, on `stage_devices` devices,
    on FSDP2 (`fsdp2`) or torch's context parallelism (`context_parallel`): the one rule,
    which the runtime (runtime/engines.py `default_compile`) and this model (`eager_terms`)
    both ask. On CUDA, where it was measured to help: tensor-parallel stages (eager DTensor
    dispatch is host-bound: gpt-1.3b tp2 on 2 H200s 0.50 s per step compiled against 1.26 s
    eager), and the others by their engine (COMPILED_BY_ENGINE: the plain module on one
    device, a pipeline's stage or the whole plan; not DDP, FSDP2 or context parallelism)."""
    if not on_gpu:
        return False
    return tp > 1 or COMPILED_BY_ENGINE[stage_engine(stage_devices, fsdp2, context_parallel)]


def compiled_norm_fp32_s(norm_elements: float, cm: ComputeModel) -> tuple[float, float]:
    """(forward, backward) seconds of one norm's fp32 traffic under autocast in a compiled block:
    Inductor fuses autocast's casts into the norm's kernel, which writes the bf16 output once
    (the fp32 output and the casts never reach memory, however many linears read it), so only
    the fp32 width of the residual stream is left (COMPILED_NORM_FP32_BYTES_PER_ELEMENT), the
    backward twice the forward's bytes. Eager blocks run each kernel (`autocast_norm_s`)."""
    fwd_bytes = norm_elements * COMPILED_NORM_FP32_BYTES_PER_ELEMENT
    bw = cm.stream_bytes_per_s * ADAMW_STREAM_SHARE
    return fwd_bytes / bw, AUTOCAST_BACKWARD_FACTOR * fwd_bytes / bw


def autocast_norm_s(norm_elements: float, linear_consumers: int, cm: ComputeModel, fp32_stream: bool = True,
                    input_accumulate: bool = False) -> tuple[float, float]:
    """(forward, backward) seconds of one norm under eager autocast with the casts autocast adds
    around it, kernel by kernel, bytes per element of its output (`norm_elements`), each at its
    kind's measured bandwidth at its size (`ComputeModel.memory_bound_s`; the `cast_*` and
    `accumulate` kinds are bench/elementwise_sizes.py's). The graph prices the norm in bf16;
    the caller takes that off. Forward: the norm in fp32 (layernorm, 8) and each of the
    `linear_consumers` linears' cast of its output to bf16 (cast_narrow, 6 each). Backward: each
    linear's input gradient cast back to fp32 (cast_widen, 6 each), their fp32 sum (accumulate,
    12 for each after the first) and the norm's backward in fp32 (layernorm_backward, 12).
    Where the stream is fp32 (`fp32_stream`: autocast over fp32 weights) and the norm's input
    also feeds the residual path without a residual add making it (`input_accumulate`: the
    embedding's output), the two paths' gradients are summed in fp32 (accumulate, 12); a
    residual add's own (`fp32_residual_add_s`) sums them otherwise. Over bf16 weights
    (bench/truth's fsdp2 rows) autocast casts the norm's bf16 input to fp32 (cast_widen, 6) and
    its gradient back (cast_narrow, 6). An H200 profile of gpt-1.3b mb8 under `autopar run`
    (bench/results/profiles_h200_1gpu_2026-12-01b) has exactly these calls per block and
    microbatch (10 [8, 1024, 2048] copies: 4 casts each way and the attention output's layout
    copy and its gradient; 4 fp32 add_; 2 norms each way; 2 mixed adds)."""
    e = float(norm_elements)
    if e <= 0:
        return 0.0, 0.0

    def k(nbytes: float, kind: str) -> float:
        return cm.memory_bound_s(nbytes, kernel=kind)
    c = linear_consumers
    fwd = k(8 * e, "layernorm") + c * k(6 * e, "cast_narrow")
    bwd = c * k(6 * e, "cast_widen") + max(0, c - 1) * k(12 * e, "accumulate") + k(12 * e, "layernorm_backward")
    if not fp32_stream:
        fwd += k(6 * e, "cast_widen")
        bwd += k(6 * e, "cast_narrow")
    elif input_accumulate:
        bwd += k(12 * e, "accumulate")
    return fwd, bwd


def fp32_residual_add_s(elements: float, read_bytes_per_element: float, shared: bool,
                        cm: ComputeModel) -> tuple[float, float]:
    """(forward, backward) seconds of a residual add into autocast's fp32 stream whose output a
    norm reads: forward, the add reading its operands (`read_bytes_per_element`: 4 for the fp32
    stream, 2 for a linear's bf16 output) and writing fp32 (add); backward, where its output
    also feeds the next residual add (`shared`), that path's gradient and the norm's summed in
    fp32 (accumulate, 12). The graph prices it in bf16 (read 2 + 2, write 2, and a bf16 sum);
    the caller takes that off."""
    e = float(elements)
    if e <= 0:
        return 0.0, 0.0
    fwd = cm.memory_bound_s((read_bytes_per_element + 4) * e, kernel="add")
    bwd = cm.memory_bound_s(12 * e, kernel="accumulate") if shared else 0.0
    return fwd, bwd


def bias_grad_sum_s(grad_bytes: float, cm: ComputeModel, fused: bool = False) -> float:
    """A linear's bias gradient: its output gradient (`grad_bytes`) summed over the tokens. The
    graph's linear prices its GEMMs only, as an engine that fuses the sum into the weight
    gradient's GEMM (cuBLASLt's bias-gradient epilogue) runs it; eager PyTorch launches a
    reduction kernel of its own, which runs at the `token_sum` kind's bandwidth (a bf16 sum
    over the first dim: 1.3 TB/s at 16 MiB, 3.6-4.0 from 256 MiB on an H200,
    bench/elementwise_sizes.py). In a compiled block (`fused`) Inductor's two-pass reduction
    reads the gradient at about the streaming rate (gpt-1.3b mb8: 10.8 ms per step against
    17.0 eager), priced on the `add` kind."""
    if grad_bytes <= 0:
        return 0.0
    return cm.memory_bound_s(grad_bytes, kernel="add" if fused else "token_sum")


def rotary_s(elems: float, cm: ComputeModel) -> tuple[float, float]:
    """(forward, backward) seconds of rotary embedding on one bf16 tensor of `elems` elements
    (q or k, [batch, heads, seq, head_dim]) as eager PyTorch runs the rotate-half form
    `x * cos + cat(-x2, x1) * sin` under autocast, whose tables are fp32 (the block's input is
    the fp32 residual stream: graphs/zoo/llama.py). Kernel by kernel, bytes per element of x,
    each at its kind's measured bandwidth at its size (the kinds are the profile's rows;
    `cast_narrow`, `cast_widen` and `broadcast_mul` are bench/elementwise_sizes.py's):
    forward, neg of one half (copy, 2), the cat (copy, 4), the two table multiplies, which
    promote to fp32 (broadcast_mul, 6 each), their fp32 sum (add, 12) and SDPA's cast of it to
    bf16 (cast_narrow, 6); backward, that cast's gradient to fp32 (cast_widen, 6), the two
    gradient multiplies by the tables (broadcast_mul, 8 each) and their casts to bf16
    (cast_narrow, 6 each), neg's gradient (copy, 2), the two half-slices' gradients (a zero
    fill and a copy into it, 2 + 2 each) and the three paths' sum (add, 6 each of two). The
    calls and shapes are those of an H200 profile of llama-1b-gqa mb4 under `autopar run`
    (bench/results/profiles_h200_1gpu_2026-12-01b: 64.4 ms of these ops per step, 62.0 priced
    so); the graph's ops price the forward's five kernels at streaming rates and the backward
    as their mirrors."""
    if elems <= 0:
        return 0.0, 0.0
    e = float(elems)

    def k(nbytes: float, kind: str) -> float:
        return cm.memory_bound_s(nbytes, kernel=kind)
    fwd = (k(2 * e, "copy") + k(4 * e, "copy") + 2 * k(6 * e, "broadcast_mul") + k(12 * e, "add")
           + k(6 * e, "cast_narrow"))
    bwd = (k(6 * e, "cast_widen") + 2 * (k(8 * e, "broadcast_mul") + k(6 * e, "cast_narrow")) + k(2 * e, "copy")
           + 2 * (k(2 * e, "copy") + k(2 * e, "copy")) + 2 * k(6 * e, "add"))
    return fwd, bwd


def fused_pointwise_s(input_bytes: float, output_bytes: float, const_bytes: float, param_bytes: float,
                      cm: ComputeModel) -> tuple[float, float]:
    """(forward, backward) seconds of one chain of a compiled block's pointwise ops (elementwise,
    norms, copies) that Inductor fuses into one kernel each way. The forward reads the chain's
    activation inputs (`input_bytes`), constants (`const_bytes`: rotary tables) and weights
    (`param_bytes`: the norm's) once and writes the tensors that leave the chain (`output_bytes`)
    once; the backward reads those tensors' gradients, the saved inputs, the constants and
    weights, and writes the inputs' and the weights' gradients. These are the bytes the graph
    counts for one op (forward in + out, backward out + 2 in), at the model's memory-bound price,
    so a chain of one op costs what its eager kernel costs; an eager chain pays a read and a
    write per op, its intermediates reaching memory."""
    fwd_bytes = input_bytes + const_bytes + param_bytes + output_bytes
    bwd_bytes = output_bytes + 2 * input_bytes + const_bytes + 2 * param_bytes
    return cm.memory_bound_s(fwd_bytes), cm.memory_bound_s(bwd_bytes)


def fp32_residual_extra_bytes(stored_bytes: float, bytes_per_element: float) -> float:
    """Bytes beyond `stored_bytes` (a residual-stream tensor at the graph's precision) that
    autocast's fp32 copy of it takes."""
    if bytes_per_element <= 0 or bytes_per_element >= FP32_BYTES:
        return 0.0
    return stored_bytes * (FP32_BYTES / bytes_per_element - 1)


def grad_bucket_copy_s(synced_params: float, cm: ComputeModel) -> float:
    """DDP's copy of the gradients of `synced_params` parameters into its buckets."""
    return DDP_BUCKET_COPY_BYTES_PER_PARAM * synced_params / cm.stream_bytes_per_s if synced_params > 0 else 0.0


def fsdp_block_comm_s(fwd_compute_s: float, bwd_compute_s: float, all_gather_fwd_s: float,
                      all_gather_bwd_s: float, reduce_scatter_s: float, first: bool = False,
                      last: bool = False) -> tuple[float, float, float]:
    """(exposed forward, exposed backward, hidden) seconds of one FSDP2 block's collectives per
    microbatch. FSDP2 issues them on one NCCL stream: in forward the next block's all-gather
    runs while this block computes; in backward, while block i computes, the stream runs the
    reduce-scatter of block i + 1 (which waited for its gradients) and then the all-gather of
    block i - 1 prefetched by block i's pre-backward hook. What a block's compute does not cover
    delays the next block: per block max(0, all-gather - forward compute) and max(0,
    all-gather + reduce-scatter - backward compute). Nothing hides the first block's forward
    all-gather (`first`), the last block's backward all-gather (`last`: nothing prefetches it)
    or the first block's reduce-scatter (`first`: it comes after the last backward compute);
    the root's collectives (embedding, head) are exposed outside this. For equal blocks the sum
    over the blocks bounds the two-stream schedule's delay from above by at most one block's
    steady-state delay (tests/unit/test_calibration.py simulates it)."""
    total = all_gather_fwd_s + all_gather_bwd_s + reduce_scatter_s
    fwd = all_gather_fwd_s if first else max(0.0, all_gather_fwd_s - fwd_compute_s)
    bwd = (max(0.0, all_gather_bwd_s + reduce_scatter_s - bwd_compute_s)
           + (all_gather_bwd_s if last else 0.0) + (reduce_scatter_s if first else 0.0))
    bwd = min(bwd, total - fwd)
    return fwd, bwd, total - fwd - bwd


def host_s(n_linears: int, n_other_ops: int, n_blocks: int, tp: bool, fsdp: bool,
           cm: ComputeModel, ddp: bool = False, compiled: bool = False,
           split_blocks: bool | None = None, n_microbatches: int = 1,
           fsdp_accumulating: bool = False) -> tuple[float, float]:
    """(forward, backward) host dispatch seconds of one microbatch through a stage: per eager op
    (`n_linears`, `n_other_ops`) and per transformer block (`n_blocks`). With `compiled`
    blocks (`compiled_per_block`) the ops counted are only those outside the blocks (embedding,
    head, loss), and each block costs the host one compiled region's call,
    HOST_COMPILED_S_PER_BLOCK where the blocks' weights are split (`split_blocks`, None: `tp`;
    the region wraps and unwraps DTensors), HOST_COMPILED_PLAIN_S_PER_BLOCK where they are not
    (its guards, the launches of its kernels and collectives, the gradient accumulation of its
    parameters) in place of its ops' dispatch and DTensor's; the engines' hooks (FSDP2, DDP)
    stay per block as measured eager (not measured compiled). FSDP2's once-per-step part
    (HOST_FSDP_STEP_S_PER_BLOCK) is spread over the step's `n_microbatches`: the time returned
    is per microbatch. Where FSDP2 is `fsdp_accumulating` (ZeRO-1: one reduce-scatter, in the
    last microbatch) its per-microbatch part is HOST_FSDP_NO_SYNC_SHARE of its own in every
    other microbatch: those hooks reduce-scatter nothing."""
    split = tp if split_blocks is None else split_blocks
    compiled_s = HOST_COMPILED_S_PER_BLOCK if split else HOST_COMPILED_PLAIN_S_PER_BLOCK
    n = max(1, n_microbatches)
    quiet = (n - 1) / n if fsdp_accumulating else 0.0      # the share of microbatches that skip the sync
    fsdp_s = HOST_FSDP_S_PER_BLOCK * (1 - quiet * (1 - HOST_FSDP_NO_SYNC_SHARE)) + HOST_FSDP_STEP_S_PER_BLOCK / n
    per_block = ((compiled_s if compiled else HOST_TP_S_PER_BLOCK if tp else 0.0)
                 + (fsdp_s if fsdp else 0.0) + (HOST_DDP_S_PER_BLOCK if ddp else 0.0))
    total = n_linears * HOST_S_PER_LINEAR + n_other_ops * 2 * cm.launch_s + n_blocks * per_block
    return total * HOST_FORWARD_SHARE, total * (1 - HOST_FORWARD_SHARE)


def pipeline_grad_scale_s(local_params: float, n_microbatches: int, cm: ComputeModel) -> float:
    """Per step, after a pipeline stage's last backward: the schedule's division of the fp32
    gradients of `local_params` parameters by the number of microbatches (none with one)."""
    if n_microbatches <= 1 or local_params <= 0:
        return 0.0
    return PIPELINE_GRAD_SCALE_BYTES_PER_PARAM * local_params / (cm.stream_bytes_per_s * ADAMW_STREAM_SHARE)


def gpu_idle_s(n_blocks: int) -> tuple[float, float]:
    """(forward, backward) seconds per microbatch that an eager stage of `n_blocks` transformer
    blocks idles beyond its ops: between the kernels the GPU waits for its CPU's next launch,
    beyond the profile's back-to-back gap (eager.py "GPU idle")."""
    total = n_blocks * GPU_IDLE_S_PER_BLOCK
    return total * HOST_FORWARD_SHARE, total * (1 - HOST_FORWARD_SHARE)


def state_bytes(local_params: float, ddp_buckets: bool, n_microbatches: int) -> float:
    """Bytes held for the whole step beyond weights, gradients and optimizer state: DDP's
    gradient buckets, and autocast's bf16 weight cache when one region spans microbatches."""
    return local_params * ((DDP_BUCKET_BYTES_PER_PARAM if ddp_buckets else 0)
                           + (AUTOCAST_CACHE_BYTES_PER_PARAM if n_microbatches > 1 else 0))


def ddp_rebuild_transient_bytes(local_params: float) -> float:
    """DDP's first buckets (fp32, every one of `local_params` parameters), alive beside the
    rebuilt ones from the second step's forward until that step's first gradient all-reduce
    releases them (see the docstring, "DDP"): at the activation peak of a training loop's
    second step, not at the end of its backward."""
    return DDP_BUCKET_BYTES_PER_PARAM * local_params


def gradients_absent_at_activation_peak_bytes(local_params: float, grad_params: float, zero3: bool,
                                              n_microbatches: int, fsdp_zero1: bool = False) -> float:
    """How far below weights + gradients + optimizer state (16 B per parameter) a GPU's state
    is at its activation peak, the start of the loss backward, in a one-microbatch step:
    `zero_grad(set_to_none=True)` has freed the fp32 gradients (4 B for each of `grad_params`)
    and none is made yet, while autocast's bf16 weight copies (2 B per local parameter; none
    under ZeRO-3, whose bf16 weights are gathered per block) are saved for the backward. With
    several microbatches the gradients exist after the first one (and `state_bytes` counts
    the weight cache), but for ZeRO-1 on FSDP2 (`fsdp_zero1`), whose sharded gradients come only
    with the step's one reduce-scatter, after the activations (`fsdp_zero12_state_bytes`)."""
    if n_microbatches > 1:
        return FP32_BYTES * grad_params if fsdp_zero1 else 0.0
    return FP32_BYTES * grad_params - (0.0 if zero3 else AUTOCAST_CACHE_BYTES_PER_PARAM * local_params)


def autocast_input_copies_bytes(norm_elements: float, linear_consumers: int, compiled: bool = False) -> float:
    """The bf16 copies of one norm's fp32 output beyond the one the graph saves: every linear
    that reads it casts it to bf16 itself and saves its own copy for its weight gradient, so
    `linear_consumers` linears keep that many copies (autocast caches only the casts of leaf
    tensors, the weights). In a compiled block (`compiled`) none: the casts of one tensor trace
    to identical `_to_copy` nodes, which AOTAutograd's common-subexpression elimination merges
    into one, the copy the graph saves."""
    if compiled:
        return 0.0
    return AUTOCAST_DTYPE_BYTES * norm_elements * max(0, linear_consumers - 1)


def loss_stash_bytes(saved_logits_bytes: float) -> float:
    """The change to a stage's stash, per microbatch in flight, where the graph saves
    `saved_logits_bytes` of logits for the loss: the eager step keeps none of them (its fp32
    log-softmax output is counted in the loss's working set, CROSS_ENTROPY_PEAK_BYTES_PER_LOGIT)."""
    return -saved_logits_bytes


def tied_embedding_grad_bytes(tied_params: float) -> float:
    """At the end of the backward, with every gradient made: the embedding backward's dense fp32
    gradient of a weight the LM head shares, alive while it is added into the `.grad` the head's
    gradient made (single-gpt-2.6b mb1 allocates 0.9 GiB over 16 B per parameter, 2 x 4 B x
    vocab x hidden at its peak; an untied embedding's gradient becomes `.grad` itself)."""
    return TIED_EMBEDDING_GRAD_BYTES_PER_PARAM * tied_params


def fsdp_buffer_bytes(root_params: float, largest_block_params: float) -> tuple[float, float]:
    """(held, transient) bytes of FSDP2's unsharded buffers on one GPU, from the unsharded
    (per tensor-parallel shard) parameter counts of the root module (embedding, final norm,
    head: gathered for the forward, kept until the root's post-backward at the end, with their
    bf16 gradients) and of the largest wrapped block. In a block's backward: its bf16 weights (2 B)
    and gradients (2), its fp32 reduce-scatter input (4) and the previous block's (4, kept until
    the next reduce-scatter is issued), and the next block's prefetched all-gather buffer and
    unsharded copy (2 + 2)."""
    return FSDP_ROOT_BYTES_PER_PARAM * root_params, FSDP_BLOCK_BYTES_PER_PARAM * largest_block_params


def zero3_grad_pool_bytes(sharded_grad_params: float) -> float:
    """Memory FSDP2's reduce-scatter stream keeps in its own allocator pool: the sharded fp32
    gradients of `sharded_grad_params` parameters (reserved all step, allocated only from their
    reduce-scatter to the next zero_grad). ZeRO-3's, and ZeRO-1/2's where they run on FSDP2
    (`fsdp_zero12`): the same engine allocates them the same way."""
    return FP32_BYTES * sharded_grad_params


def loss_segment_bytes(cross_entropy_peak_bytes: float) -> float:
    """One fp32 logits tensor (the log-softmax output, or its gradient) of a loss whose working
    set is `cross_entropy_peak_bytes`: the largest single allocation of a step with a large
    vocabulary, which the allocator may have to reserve once more beyond the peak allocated."""
    return cross_entropy_peak_bytes * FP32_BYTES / CROSS_ENTROPY_PEAK_BYTES_PER_LOGIT


def expandable_segments(alloc_conf: str) -> bool:
    """Whether the caching allocator runs with expandable segments under the allocator
    configuration `alloc_conf` (PYTORCH_CUDA_ALLOC_CONF's syntax, "" for none: default segments)."""
    opts = dict(kv.split(":", 1) for kv in alloc_conf.replace(" ", "").split(",") if ":" in kv)
    return opts.get("expandable_segments", "").lower() == "true"


def reserve_fraction(expandable: bool) -> float:
    """The allocator's reserve beyond the allocated, as a fraction of it: RESERVE_FRACTION_EXPANDABLE
    with expandable segments (`autopar run`'s allocator), RESERVE_FRACTION with the default ones."""
    return RESERVE_FRACTION_EXPANDABLE if expandable else RESERVE_FRACTION


def reserved_bytes(allocated_bytes: float, fsdp: bool, grad_pool_bytes: float = 0.0,
                   loss_segment: float = 0.0, expandable: bool = True) -> float:
    """What the caching allocator reserves at a peak of `allocated_bytes` allocated. Where FSDP2
    runs the step (`fsdp`: ZeRO-3, or ZeRO-1/2 as `autopar run` runs them) `allocated_bytes` is what the pools hold at their own peaks (the compute stream's at the
    activation peak, and `grad_pool_bytes` of FSDP2's gradients, see `zero3_grad_pool_bytes`,
    even where they are absent at that moment), and the fraction is the compute stream's only.
    At least `loss_segment` (`loss_segment_bytes`) over the allocated: the step's largest
    tensors, the loss's fp32 logits, come back every step, and after the first step the
    optimizer's state (allocated lazily by the first `opt.step()`, into the segments the loss
    had freed) can take part of the segment one of them had, so the next step reserves a new
    one (single-llama-1b s8192 mb4 with full recomputation: reserved - allocated = 15.66 GiB,
    one fp32 tensor of 32,768 x 128,256 logits to the 0.01 GiB; the fraction gives 9.0)."""
    pool = grad_pool_bytes if fsdp else 0.0
    f = reserve_fraction(expandable)
    return max((allocated_bytes - pool) * (1 + f) + pool, allocated_bytes + loss_segment)


def outside_allocator_bytes(n_gpus: int) -> float:
    """CUDA context, and NCCL's communicators and buffers where the plan communicates."""
    return CUDA_CONTEXT_BYTES + (NCCL_BYTES if n_gpus > 1 else 0.0)


def allocatable_bytes(capacity_bytes: float, n_gpus: int, expandable: bool = True) -> float:
    """The most a plan may allocate on a GPU of `capacity_bytes` (the inverse of
    `device_peak_bytes`, less the cuBLAS workspaces) where it holds no FSDP2 gradient pool and
    its loss segment is within the reserve fraction: the planner's cap (SearchSpace), which its
    tables raise or lower per stage by `stage_allocatable_bytes` (the pool is the stage's, not
    the plan's)."""
    usable = capacity_bytes - outside_allocator_bytes(n_gpus)
    return max(0.0, usable / (1 + reserve_fraction(expandable)) - CUBLAS_WORKSPACE_BYTES)


def stage_allocatable_bytes(cap_bytes, grad_pool_bytes=0.0, loss_peak_bytes=0.0, grads_absent_bytes=0.0,
                            held_bytes=0.0, expandable: bool = True):
    """The most one GPU's stages may allocate (weights, state, buffers, activations: the
    planner's memory figure, without the cuBLAS workspaces) on a GPU whose `allocatable_bytes`
    is `cap_bytes` (> 0), where they hold `grad_pool_bytes` of FSDP2's gradient pool
    (`zero3_grad_pool_bytes`), their loss's working set is `loss_peak_bytes` (the largest of the
    GPU's stages'), `grads_absent_bytes` of their state is absent at the activation peak
    (`gradients_absent_at_activation_peak_bytes`; counted only without a pool, where the
    allocator sees it free) and they hold `held_bytes` through the step (what stays at the
    end of the backward, a tied embedding's gradient with it): the inverse of
    `device_peak_bytes` for them, as `evaluate` sums a GPU.
    With a = the figure + workspaces, u = what the allocator may reserve ((cap + w)(1 + f)):
    device_peak_bytes fits where (a - pool)(1 + f) + pool <= u and a + segment <= u, so the
    pool raises the cap by pool f / (1 + f) and a loss segment may lower it; the absent state
    raises it by that much, while what stays held must fit alone (evaluate's
    min(absent, activations less the tied gradient)); with a pool neither counts (evaluate
    reads the pools' peak, every state present). The planner's tables compare each stage
    with this (RangeTable.cap_bytes), so `autopar plan --eager` offers a stage where `autopar
    evaluate --eager` says it fits, and only there. Floats or numpy arrays."""
    f = reserve_fraction(expandable)
    usable = (cap_bytes + CUBLAS_WORKSPACE_BYTES) * (1 + f)
    cap = np.minimum(cap_bytes + grad_pool_bytes * f / (1 + f),
                     usable - loss_segment_bytes(loss_peak_bytes) - CUBLAS_WORKSPACE_BYTES)
    # with a pool, evaluate reads the pools' peak (all state present), not the allocated one
    pooled = np.asarray(grad_pool_bytes) > 0
    with np.errstate(invalid="ignore"):     # the tables' dead cells (inf throughout) come out NaN: never fit
        return np.where(pooled, cap, np.where(np.asarray(held_bytes) <= cap, cap + grads_absent_bytes, -np.inf))


def device_peak_bytes(allocated_bytes: float, fsdp: bool, n_gpus: int, grad_pool_bytes: float = 0.0,
                      loss_segment: float = 0.0, expandable: bool = True) -> float:
    """A GPU's peak memory: the allocator's reservation for `allocated_bytes` (FSDP2's gradient
    pool `grad_pool_bytes` among them, the loss's `loss_segment`), and what lies outside it."""
    return (reserved_bytes(allocated_bytes, fsdp, grad_pool_bytes, loss_segment, expandable)
            + outside_allocator_bytes(n_gpus))
