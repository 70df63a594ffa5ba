/**
 * Tracing against PyTorch: saved activations and the forward-value
 * experiments of every fixture's `reference.json` (zero ablation, patching,
 * logit lens, steering, scaling, a module's second call), and the demo facts
 * of stories260K. Gradient experiments belong to a later issue.
 */
import { afterAll, beforeAll, describe, expect, test } from "vitest"
import { readFileSync } from "node:fs"
import { type DType, type Envoy, LanguageModel, NNsight, Tensor, type TensorProxy } from "../src/index.js"

interface RefTensor {
  readonly dtype: string
  readonly shape: ReadonlyArray<number>
  readonly data: ReadonlyArray<number>
}
interface RefHook {
  readonly module: string
  readonly call: number
  readonly input: ReadonlyArray<RefTensor>
  readonly output: ReadonlyArray<RefTensor>
}
interface Reference {
  readonly inputs: Record<string, RefTensor>
  readonly outputs: Record<string, RefTensor>
  readonly inputs_b: Record<string, RefTensor>
  readonly outputs_b: Record<string, RefTensor>
  readonly inputs_short?: Record<string, RefTensor>
  readonly outputs_short?: Record<string, RefTensor>
  readonly inputs_batch?: Record<string, RefTensor>
  readonly outputs_batch?: Record<string, RefTensor>
  readonly hooks: ReadonlyArray<RefHook>
  readonly experiments: ReadonlyArray<{ readonly name: string; readonly result: Record<string, RefTensor> }>
  readonly tokens?: {
    readonly prompt_a: string
    readonly prompt_b: string
    readonly ids_a: ReadonlyArray<number>
    readonly ids_b: ReadonlyArray<number>
    readonly lily: number
    readonly tim: number
  }
}

const reference = (name: string): Reference => JSON.parse(readFileSync(`test/fixtures/${name}/reference.json`, "utf8"))
const tensor = (r: RefTensor): Tensor => Tensor.from([...r.data], r.dtype as DType.DType, r.shape)
const inputsOf = (r: Record<string, RefTensor>): Record<string, Tensor> =>
  Object.fromEntries(Object.entries(r).map(([k, v]) => [k, tensor(v)]))
const experiment = (ref: Reference, name: string): Record<string, RefTensor> => {
  const e = ref.experiments.find((x) => x.name === name)
  if (e === undefined) throw new Error(`no experiment ${name}`)
  return e.result
}

/** |a - b| <= tol * max(1, |b|) elementwise, same shape. */
const expectClose = (actual: Tensor, expected: RefTensor | Tensor, tol = 1e-4): void => {
  const want = expected instanceof Tensor ? expected : tensor(expected)
  expect(actual.shape).toEqual(want.shape)
  const a = actual.toNumbers()
  const b = want.toNumbers()
  let worst = 0
  let at = -1
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]) / Math.max(1, Math.abs(b[i]))
    if (!(d <= worst)) {
      worst = d
      at = i
    }
  }
  if (!(worst <= tol)) expect.fail(`max scaled |diff| ${worst} at flat index ${at} (got ${a[at]}, want ${b[at]}) exceeds ${tol}`)
}

/** The envoy of a dotted module path ("" is the model). */
const mod = (m: Envoy, path: string): Envoy => (path === "" ? m : path.split(".").reduce<Envoy>((e, k) => e[k], m))

/** Envoys of module calls in one trace, reached in order with `.next()`. */
const walker = (m: Envoy) => {
  const current = new Map<string, number>()
  return (path: string, call: number): Envoy => {
    let e = mod(m, path)
    for (let k = current.get(path) ?? 0; k < call; k++) {
      e = e.next()
      current.set(path, k + 1)
    }
    return e
  }
}

/** Every reference hook of a fixture, read in one trace, compared one by one. */
const hookTests = (
  name: string,
  load: () => Promise<NNsight | LanguageModel>,
  input: (ref: Reference) => unknown,
  options: { readonly allOutputs?: boolean; readonly inputIndex?: Record<string, number> } = {}
) => {
  const ref = reference(name)
  let saved: ReadonlyArray<{ readonly i: ReadonlyArray<Tensor>; readonly o: ReadonlyArray<Tensor> } | undefined> = []
  const present = new Set<string>()
  beforeAll(async () => {
    const net = await load()
    try {
      for (const p of net.tree.modules.keys()) present.add(p)
      const hooks = ref.hooks.map((h) => (present.has(h.module) ? h : undefined))
      saved = await (net as NNsight).trace(input(ref) as Record<string, Tensor>, (m) => {
        const at = walker(m)
        return hooks.map((h) => (h === undefined ? undefined : { i: at(h.module, h.call).inputs, o: at(h.module, h.call).outputs }))
      })
    } finally {
      await net.close()
    }
  })
  // modules with ONNX nodes (dropouts export to none and are not in the tree)
  const withNodes = ref.hooks.map((h, k) => [h, k] as const).filter(([h]) => !/dropout|\.drop$/.test(h.module))
  for (const [h, k] of withNodes) {
    test(`${h.module} (call ${h.call}): input[0] and output${options.allOutputs ? "s" : "[0]"} equal PyTorch's`, () => {
      expect(present.has(h.module)).toBe(true)
      const s = saved[k]!
      expectClose(s.i[0], h.input[options.inputIndex?.[h.module] ?? 0])
      const outs = options.allOutputs ? h.output : h.output.slice(0, 1)
      outs.forEach((o, q) => expectClose(s.o[q], o))
    })
  }
}

// ---------------------------------------------------------------------------

describe("tiny_mlp", () => {
  const ref = reference("tiny_mlp")
  const x = tensor(ref.inputs.x)
  let net: NNsight
  beforeAll(async () => {
    net = await NNsight.load("test/fixtures/tiny_mlp/model.onnx")
  })
  afterAll(() => net.close())

  test("plain trace: output and the second input set", async () => {
    const a = await net.trace(x, (m) => ({ y: m.output, y2: m.layer2.output }))
    expectClose(a.y, ref.outputs.y)
    expectClose(a.y2, ref.outputs.y)
    const b = await net.trace(inputsOf(ref.inputs_b), (m) => m.output)
    expectClose(b, ref.outputs_b.y)
  })

  test("layer1_zero: layer1.output.set(0)", async () => {
    const y = await net.trace(x, (m) => {
      m.layer1.output.set(0)
      return m.output
    })
    expectClose(y, experiment(ref, "layer1_zero").y)
  })

  test("layer1_times_2: layer1.output.update(x => x.mul(2))", async () => {
    const y = await net.trace(x, (m) => {
      m.layer1.output.update((h) => h.mul(2))
      return m.layer2.output
    })
    expectClose(y, experiment(ref, "layer1_times_2").y)
  })

  test("layer1_col2_set_5: layer1.output.setAt([':', 2], 5)", async () => {
    const { y, h } = await net.trace(x, (m) => {
      m.layer1.output.setAt([":", 2], 5)
      return { y: m.output, h: m.layer1.output }
    })
    expectClose(y, experiment(ref, "layer1_col2_set_5").y)
    expect(h.at(":", 2).toNumbers()).toEqual([5, 5])
    // the other columns are layer1's original output
    expectClose(h.at(":", 0), tensor(ref.hooks[0].output[0]).at(":", 0))
  })

  describe("saved activations", () => {
    hookTests("tiny_mlp", () => NNsight.load("test/fixtures/tiny_mlp/model.onnx"), (r) => inputsOf(r.inputs))
  })
})

// ---------------------------------------------------------------------------

describe("twice (act and shared are called twice)", () => {
  const ref = reference("twice")
  const x = tensor(ref.inputs.x)
  let net: NNsight
  beforeAll(async () => {
    net = await NNsight.load("test/fixtures/twice/model.onnx")
  })
  afterAll(() => net.close())

  test("plain trace: output on both input sets", async () => {
    expectClose(await net.trace(x, (m) => m.output), ref.outputs.y)
    expectClose(await net.trace(inputsOf(ref.inputs_b), (m) => m.out.output), ref.outputs_b.y)
  })

  test("shared_call1_zero: shared.next().output.set(0)", async () => {
    const y = await net.trace(x, (m) => {
      m.shared.next().output.set(0)
      return m.output
    })
    expectClose(y, experiment(ref, "shared_call1_zero").y)
  })

  test("shared_call0_times_2: shared.output.update(x => x.mul(2)) on the first call", async () => {
    const y = await net.trace(x, (m) => {
      m.shared.output.update((h) => h.mul(2))
      return m.output
    })
    expectClose(y, experiment(ref, "shared_call0_times_2").y)
  })

  test("act_call1_plus_1: act.next().output.update(x => x.add(1))", async () => {
    const y = await net.trace(x, (m) => {
      const act = m.act.next()
      act.output.update((h) => h.add(1))
      return m.output
    })
    expectClose(y, experiment(ref, "act_call1_plus_1").y)
  })

  describe("saved activations (each call)", () => {
    hookTests("twice", () => NNsight.load("test/fixtures/twice/model.onnx"), (r) => inputsOf(r.inputs))
  })
})

// ---------------------------------------------------------------------------

/** The experiments shared by tiny_gpt2 and llama_tiny, in each model's names. */
const lmFixture = (
  name: "tiny_gpt2" | "llama_tiny",
  names: { readonly blocks: (m: Envoy) => Envoy; readonly norm: (m: Envoy) => Envoy; readonly mlp0: (m: Envoy) => Envoy }
) => {
  const ref = reference(name)
  const inputs = inputsOf(ref.inputs)
  let net: NNsight
  beforeAll(async () => {
    net = await NNsight.load(`test/fixtures/${name}/model.onnx`)
  })
  afterAll(() => net.close())

  test("plain trace: logits on the three input sets (dynamic batch and sequence)", async () => {
    expectClose(await net.trace(inputs, (m) => m.output), ref.outputs.logits)
    expectClose(await net.trace(inputsOf(ref.inputs_b), (m) => m.lm_head.output), ref.outputs_b.logits)
    expectClose(await net.trace(inputsOf(ref.inputs_short!), (m) => m.output), ref.outputs_short!.logits)
  })

  test("zero_ablate_mlp0: block 0's mlp output set to 0", async () => {
    const logits = await net.trace(inputs, (m) => {
      names.mlp0(m).output.set(0)
      return m.lm_head.output
    })
    expectClose(logits, experiment(ref, "zero_ablate_mlp0").logits)
  })

  test("activation_patch: block 1 output[0][0, -1] from inputs_b patched into inputs (two invokes)", async () => {
    const want = experiment(ref, "activation_patch")
    const { source, logits } = await net.trace((m, t) => {
      const source = t.invoke(inputsOf(ref.inputs_b), () => names.blocks(m)[1].output.at(0, -1))
      return t.invoke(inputs, () => {
        names.blocks(m)[1].output.setAt([0, -1], source)
        return { source, logits: m.lm_head.output }
      })
    })
    expectClose(source, want.source)
    expectClose(logits, want.logits)
  })

  test("logit_lens: lm_head.call(norm.call(block0.output))", async () => {
    const logits = await net.trace(inputs, (m) => m.lm_head.call(names.norm(m).call(names.blocks(m)[0].output)))
    expectClose(logits, experiment(ref, "logit_lens").logits)
  })

  test("steering: v = 0.1 * arange(32) added to block 1's input", async () => {
    const want = experiment(ref, "steering")
    const v = Tensor.from(Array.from({ length: 32 }, (_, i) => 0.1 * i), "float32")
    expectClose(v, want.v, 1e-6)
    const logits = await net.trace(inputs, (m) => {
      names.blocks(m)[1].input.update((h) => h.add(v))
      return m.lm_head.output
    })
    expectClose(logits, want.logits)
  })

  describe("saved activations", () => {
    hookTests(name, () => NNsight.load(`test/fixtures/${name}/model.onnx`), (r) => inputsOf(r.inputs), {
      // rotary_emb(x, position_ids) uses x only for its dtype: position_ids is its first ONNX input
      inputIndex: { "model.rotary_emb": 1 }
    })
  })
}

describe("tiny_gpt2", () => {
  lmFixture("tiny_gpt2", {
    blocks: (m) => m.transformer.h,
    norm: (m) => m.transformer.ln_f,
    mlp0: (m) => m.transformer.h[0].mlp
  })
})

describe("llama_tiny", () => {
  lmFixture("llama_tiny", {
    blocks: (m) => m.model.layers,
    // `m.model.norm` is typed as TensorProxy.norm (the method): see the report
    norm: (m) => mod(m, "model.norm"),
    mlp0: (m) => m.model.layers[0].mlp
  })
})

// ---------------------------------------------------------------------------

describe("stories260K", () => {
  const ref = reference("stories260K")
  const tokens = ref.tokens!
  const promptA = { input_ids: tensor(ref.inputs.input_ids), attention_mask: tensor(ref.inputs.attention_mask) }
  const promptB = { input_ids: tensor(ref.inputs_b.input_ids), attention_mask: tensor(ref.inputs_b.attention_mask) }
  const logitsA = tensor(ref.outputs.logits)
  let model: LanguageModel
  beforeAll(async () => {
    model = await LanguageModel.load("models/stories260K")
  })
  afterAll(() => model.close())

  test("plain trace: logits of A (tensors), B (id array) and the batch [A, B]", async () => {
    expectClose(await model.trace(promptA, (m) => m.lm_head.output), ref.outputs.logits)
    expectClose(await model.trace([...tokens.ids_b], (m) => m.output), ref.outputs_b.logits)
    const batch = { input_ids: tensor(ref.inputs_batch!.input_ids), attention_mask: tensor(ref.inputs_batch!.attention_mask) }
    expectClose(await model.trace(batch, (m) => m.lm_head.output.at(":", -1)), ref.outputs_batch!.logits_last)
  })

  test("zero_ablate_mlp0: model.layers[0].mlp.output.set(0)", async () => {
    const want = experiment(ref, "zero_ablate_mlp0")
    const { logits, argmax } = await model.trace(promptA, (m) => {
      m.model.layers[0].mlp.output.set(0)
      const logits = m.lm_head.output.at(":", -1)
      return { logits, argmax: logits.argmax(-1) }
    })
    expectClose(logits, want.logits)
    expect(argmax.toNumbers()).toEqual([...want.argmax.data])
  })

  test("activation_patch: layers[2] last position from prompt B (two invokes) gives ' Timmy'", async () => {
    const want = experiment(ref, "activation_patch")
    const { source, logits } = await model.trace((m, t) => {
      const source = t.invoke(promptB, () => m.model.layers[2].output.at(":", -1))
      return t.invoke(promptA, () => {
        m.model.layers[2].output.setAt([":", -1], source)
        return { source, logits: m.lm_head.output }
      })
    })
    expectClose(source.reshape(-1), want.source)
    expectClose(logits.at(":", -1), want.logits)
    expect(logits.at(0, -1).argmax()).toBe(want.argmax.data[0])
    // earlier positions are unchanged
    expectClose(logits.at(":", "0:13"), logitsA.at(":", "0:13"))
  })

  test("activation_patch_all_positions: layers[2] output from B everywhere gives B's logits", async () => {
    const want = experiment(ref, "activation_patch_all_positions")
    const logits = await model.trace((m, t) => {
      const source = t.invoke(promptB, () => m.model.layers[2].output)
      return t.invoke(promptA, () => {
        m.model.layers[2].output.set(source)
        return m.lm_head.output.at(":", -1)
      })
    })
    expectClose(logits, want.logits)
    expectClose(logits, tensor(ref.outputs_b.logits).at(":", -1))
  })

  test("logit_lens: lm_head.call(model.norm.call(layers[i].output)) for every layer", async () => {
    const want = experiment(ref, "logit_lens")
    const { logits, argmax } = await model.trace(promptA, (m, t) => {
      const rows = [0, 1, 2, 3, 4].map((i) => m.lm_head.call(m.model.norm.call(m.model.layers[i].output)).at(":", -1))
      const logits = t.cat(rows, 0)
      return { logits, argmax: logits.argmax(-1) }
    })
    expectClose(logits, want.logits)
    expect(argmax.toNumbers()).toEqual([...want.argmax.data])
  })

  for (const [name, scale, plus, minus, how] of [
    ["steering", 0.5, tokens.lily, tokens.tim, "update"],
    ["steering_to_tim", 2, tokens.tim, tokens.lily, "set"]
  ] as const) {
    test(`${name}: v = ${scale} * (E[${plus}] - E[${minus}]) added to layers[3].input (.${how})`, async () => {
      const want = experiment(ref, name)
      const out = await model.trace(promptA, (m) => {
        const e: TensorProxy = m.model.embed_tokens.weight
        const v = e.at(plus).sub(e.at(minus)).mul(scale)
        const input = m.model.layers[3].input
        if (how === "update") input.update((h) => h.add(v))
        else input.set(input.add(v))
        const all = m.lm_head.output
        return { v, logits: all.at(":", -1), argmax: all.argmax(-1) }
      })
      expectClose(out.v, want.v)
      expectClose(out.logits, want.logits)
      expect(out.argmax.shape).toEqual(want.argmax.shape)
      expect(out.argmax.toNumbers()).toEqual([...want.argmax.data])
      // steering toward " Lily" keeps every argmax; toward " Tim" changes the last one to it
      if (name === "steering") expect(out.argmax.toNumbers()).toEqual([...want.argmax_unsteered.data])
      else expect(out.argmax.toNumbers().at(-1)).toBe(tokens.tim)
    })
  }

  test("demo facts: ' Lily' after the girl prompt; patching the boy prompt at layer 2 gives ' Timmy'", async () => {
    expect(model.tokenizer.encode(tokens.prompt_a)).toEqual(tokens.ids_a)
    expect(model.tokenizer.encode(tokens.prompt_b)).toEqual(tokens.ids_b)
    const logits = await model.trace(tokens.prompt_a, (m) => m.lm_head.output.at(0, -1))
    expect(logits.argmax()).toBe(tokens.lily)
    expect(model.tokenizer.token(logits.argmax())).toBe(" Lily")
    const patched = await model.trace((m, t) => {
      const src = t.invoke(tokens.prompt_b, () => m.model.layers[2].output.at(":", -1))
      return t.invoke(tokens.prompt_a, () => {
        m.model.layers[2].output.setAt([":", -1], src)
        return m.lm_head.output.at(0, -1)
      })
    })
    expect(model.tokenizer.token(patched.argmax())).toBe(" Timmy")
  })

  describe("saved activations (all outputs: hidden state and present key/value)", () => {
    hookTests(
      "stories260K",
      () => LanguageModel.load("models/stories260K"),
      (r) => ({ input_ids: tensor(r.inputs.input_ids), attention_mask: tensor(r.inputs.attention_mask) }),
      { allOutputs: true }
    )
  })
})
