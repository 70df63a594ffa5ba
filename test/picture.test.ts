/**
 * Pictures of intervention graphs and module trees (`Picture.toMermaid`,
 * `toDot`, `treeToMermaid`, `treeToDot`), pinned by file snapshots under
 * test/__snapshots__/ (render a `.dot` with `dot -Tpng x.dot -o x.png`; paste
 * a `.mmd` into any Mermaid renderer). Pictures carry no sites (file paths),
 * so they are the same on every machine.
 */
import { readdirSync, readFileSync } from "node:fs"
import { Graphviz } from "@hpcc-js/wasm-graphviz"
import { afterAll, beforeAll, describe, expect, test } from "vitest"
import { Graph, LanguageModel, NNsight, Picture, Tensor } from "../src/index.js"

let model: LanguageModel
let net: NNsight
beforeAll(async () => {
  model = await LanguageModel.load("models/stories260K")
  net = await NNsight.load("test/fixtures/tiny_mlp/model.onnx")
})
afterAll(async () => {
  await model.close()
  await net.close()
})

const promptA = "Once upon a time, there was a little boy named"
const promptB = "Once upon a time, there was a little girl named"

/** Two invokes: layer 2's last position from promptA patched into promptB. */
const patching = (): Graph.Graph =>
  model.recordSession((s) =>
    s.trace((m, t) => {
      const src = t.invoke(promptA, () => m.model.layers[2].output.at(":", -1))
      return t.invoke(promptB, () => {
        m.model.layers[2].output.setAt([":", -1], src)
        return { logits: m.lm_head.output }
      })
    })
  ).graph

/** The DESIGN session: a clean run, a loop with a condition, a patched run. */
const session = (): Graph.Graph =>
  model.recordSession((s) => {
    const clean = s.trace(promptA, (m) => m.model.layers[1].output)
    const acc = s.list()
    s.iter([0, 1, 2], (i) => s.cond(i.mod(2).eq(0), () => acc.append(i), () => s.log("odd", i)))
    const logits = s.trace(promptB, (m) => {
      m.model.layers[1].output.set(clean)
      return m.lm_head.output
    })
    return { logits, acc }
  }).graph

/** One input: a conditional ablation, a stop, a logit lens. */
const single = (): Graph.Graph =>
  net.record(Tensor.from([[0.1, 0.2, 0.3, 0.4, 0.5]]), (m, t) => {
    t.cond(m.layer1.output.at(":", 0).gt(0), () => m.layer1.output.setAt([":", 0], 0))
    const h = m.layer1.output.relu()
    const y = m.layer2.call(h)
    t.stop()
    return { h, y }
  }).graph

const snap = (name: string) => `__snapshots__/picture.${name}`

/** Every node and edge id of a graph is in the picture; nothing names a file. */
const checkCovers = (graph: Graph.Graph, text: string, edge: (a: number, b: number) => string): void => {
  for (const n of Graph.flatten(graph.nodes)) {
    expect(text).toContain(`n${n.id}`)
    for (const d of Graph.dependencies(n)) expect(text).toContain(edge(d, n.id))
  }
  expect(text).not.toMatch(/\.ts:\d+|\/work\/|file:/)
}

/** Mermaid flowchart structure: header, balanced subgraph/end, known line forms. */
const checkMermaid = (text: string): void => {
  const lines = text.split("\n")
  expect(lines[0]).toMatch(/^flowchart (TD|LR)$/)
  let depth = 0
  for (const raw of lines.slice(1)) {
    const line = raw.trim()
    if (line.startsWith("subgraph ")) {
      expect(line).toMatch(/^subgraph [A-Za-z_][\w]*\["[^"]*"\]$/)
      depth++
    } else if (line === "end") {
      depth--
      expect(depth).toBeGreaterThanOrEqual(0)
    } else {
      expect(line).toMatch(
        /^(\w+(\[\/"[^"]*"\/\]|\[\["[^"]*"\]\]|\{"[^"]*"\}|\["[^"]*"\]|\(\["[^"]*"\]\))|\w+ (-->|-\.->) \w+|classDef \w+ [\w:#,]+|class [\w,]+ \w+)$/
      )
    }
  }
  expect(depth).toBe(0)
}

/**
 * DOT structure: one digraph, quoted strings closed (DOT's only escape in a
 * quoted string is `\\"`, so a string ending in a lone backslash swallows its
 * closing quote), balanced braces outside strings.
 */
const checkDot = (text: string): void => {
  expect(text).toMatch(/^digraph \w+ \{\n/)
  expect(text.endsWith("}")).toBe(true)
  let depth = 0
  let inString = false
  for (let i = 0; i < text.length; i++) {
    const ch = text[i]
    if (inString) {
      if (ch === "\\") i++
      else if (ch === '"') inString = false
      else if (ch === "\n") expect.fail(`unterminated DOT string (a label ending in a lone backslash?) near ${JSON.stringify(text.slice(i - 60, i))}`)
      continue
    }
    if (ch === '"') inString = true
    if (ch === "{") depth++
    if (ch === "}") depth--
    expect(depth).toBeGreaterThanOrEqual(0)
  }
  expect(inString).toBe(false)
  expect(depth).toBe(0)
}

/** Graphviz's own parser, where it is installed (Debian: apt-get install graphviz). */
// Graphviz itself, compiled to WebAssembly (no system package needed): lays
// every DOT text out to SVG, or says where it fails
let graphviz: Graphviz
beforeAll(async () => {
  graphviz = await Graphviz.load()
})
const dotParses = (text: string): string => {
  try {
    return graphviz.layout(text, "svg", "dot").includes("<svg") ? "ok" : "no svg"
  } catch (e) {
    return String(e)
  }
}

describe("intervention graph pictures", () => {
  const cases: ReadonlyArray<readonly [string, () => Graph.Graph]> = [
    ["patching", patching],
    ["session", session],
    ["single", single]
  ]
  for (const [name, make] of cases) {
    test(`${name}: Mermaid`, async () => {
      const graph = make()
      const text = Picture.toMermaid(graph)
      checkMermaid(text)
      checkCovers(graph, text, (a, b) => `n${a} --> n${b}`)
      expect(Picture.toMermaid(make())).toBe(text)
      await expect(text + "\n").toMatchFileSnapshot(snap(`${name}.mmd`))
    })
    test(`${name}: DOT`, async () => {
      const graph = make()
      const text = Picture.toDot(graph)
      checkDot(text)
      checkCovers(graph, text, (a, b) => `n${a} -> n${b};`)
      expect(Picture.toDot(make())).toBe(text)
      await expect(text + "\n").toMatchFileSnapshot(snap(`${name}.dot`))
    })
  }

  test("the session picture draws the loop, both branches and both traces as subgraphs", () => {
    const dot = Picture.toDot(session())
    expect(dot).toMatch(/label="%\d+ for each"/)
    expect(dot).toMatch(/label="%\d+ if"/)
    expect(dot.match(/label="%\d+ trace"/g)?.length).toBe(2)
    expect(dot).toMatch(/subgraph cluster_\d+_then/)
    expect(dot).toMatch(/subgraph cluster_\d+_else/)
    expect(dot.match(/subgraph cluster_\d+_body/g)?.length).toBe(3)
  })
})

describe("module tree pictures", () => {
  test("stories260K: Mermaid", async () => {
    const text = Picture.treeToMermaid(model.tree.root)
    checkMermaid(text)
    expect(text).toContain('["lm_head: Linear"]')
    await expect(text + "\n").toMatchFileSnapshot(snap("tree.stories260K.mmd"))
  })
  test("stories260K: DOT", async () => {
    const text = Picture.treeToDot(model.tree.root)
    checkDot(text)
    // the five identical decoder layers fold into one box, as the printout folds them
    const perLayer = [...model.tree.modules.keys()].filter((p) => p.startsWith("model.layers.0.")).length
    expect(text).toContain("(0-4) 5 x: Module")
    expect(text.match(/ -> /g)?.length).toBe(model.tree.modules.size - 1 - 4 * (perLayer + 1))
    await expect(text + "\n").toMatchFileSnapshot(snap("tree.stories260K.dot"))
  })
  test("tiny_mlp: DOT and Mermaid", async () => {
    const dot = Picture.treeToDot(net.tree.root)
    const mmd = Picture.treeToMermaid(net.tree.root)
    checkDot(dot)
    checkMermaid(mmd)
    await expect(dot + "\n").toMatchFileSnapshot(snap("tree.tiny_mlp.dot"))
    await expect(mmd + "\n").toMatchFileSnapshot(snap("tree.tiny_mlp.mmd"))
  })
})

describe("labels with quotes, backslashes and newlines", () => {
  // a 38-character first line: the 40-character cut of its JSON ends inside "\n"
  const tricky = (): Graph.Graph =>
    net.recordSession((s) => {
      s.log("Once upon a time, there was a little!!\ngirl")
      s.log('say "hi"', "C:\\dir\\", "line one\nline two")
    }).graph

  test("keep the DOT valid", () => {
    const text = Picture.toDot(tricky())
    checkDot(text)
    expect(dotParses(text)).toBe("ok")
  })

  test("keep the Mermaid valid", () => {
    checkMermaid(Picture.toMermaid(tricky()))
  })
})

describe("Graphviz lays out every DOT snapshot", () => {
  const dir = new URL("./__snapshots__/", import.meta.url)
  for (const file of readdirSync(dir).filter((f) => f.startsWith("picture.") && f.endsWith(".dot"))) {
    test(file, () => {
      expect(dotParses(readFileSync(new URL(file, dir), "utf8"))).toBe("ok")
    })
  }
})
