/**
 * Pictures of intervention graphs and module trees, as Mermaid flowcharts
 * and Graphviz DOT: nodes labelled with their operation and module, reads,
 * sets and results marked, nested bodies (conditions, loops, traces) drawn
 * as subgraphs.
 *
 * @example
 * import * as Picture from "./Picture.js"
 * console.log(Picture.toMermaid(graph))
 * fs.writeFileSync("graph.dot", Picture.toDot(graph))  // dot -Tpng graph.dot -o graph.png
 *
 * @since 0.1.0
 */
import * as Graph from "./Graph.js"

interface Shape {
  readonly label: string
  readonly kind: "read" | "set" | "op" | "value" | "control" | "stop"
}

const cut = (text: string, max = 40) => (text.length > max ? text.slice(0, max - 1) + "…" : text)

const invokeLabel = (invoke: number, invokes: number) =>
  invoke < 0 ? " (every invoke)" : invokes > 1 ? ` (invoke ${invoke})` : ""

const describe = (node: Graph.Node, invokes: number): Shape => {
  switch (node._tag) {
    case "Hook":
      return {
        label: `${node.ref.module || "model"}.${node.ref.point}${node.ref.index === 0 ? "" : `[${node.ref.index}]`}${node.ref.call === 0 ? "" : ` call ${node.ref.call}`}${invokeLabel(node.ref.invoke, invokes)}`,
        kind: "read"
      }
    case "Set":
      return { label: `set ${node.ref.module || "model"}.${node.ref.point}${invokeLabel(node.ref.invoke, invokes)}`, kind: "set" }
    case "Op":
      return { label: node.op, kind: "op" }
    case "Apply":
      return { label: `${node.module}.call`, kind: "op" }
    case "Param":
      return { label: `${node.module}.${node.name}`, kind: "value" }
    case "Constant":
      return { label: `tensor ${node.value.dtype}[${node.value.shape.join(",")}]`, kind: "value" }
    case "Scalar":
      return { label: String(node.value), kind: "value" }
    case "Value":
      return { label: cut(typeof node.value === "string" ? node.value : JSON.stringify(node.value)), kind: "value" }
    case "Generated":
      return { label: "generator.output", kind: "read" }
    case "ListNew":
      return { label: "list", kind: "value" }
    case "DictNew":
      return { label: "dict", kind: "value" }
    case "Append":
      return { label: node.key === null ? "append" : `put ${node.key}`, kind: "op" }
    case "Assign":
      return { label: "assign", kind: "set" }
    case "Call":
      return { label: "apply", kind: "op" }
    case "Log":
      return { label: "log", kind: "op" }
    case "Stop":
      return { label: "stop", kind: "stop" }
    case "Grad":
      return { label: "grad", kind: "read" }
    case "SetGrad":
      return { label: "set grad", kind: "set" }
    case "Backward":
      return { label: "backward", kind: "control" }
    case "Cond":
      return { label: "if", kind: "control" }
    case "Iter":
      return { label: "for each", kind: "control" }
    case "Trace":
      return { label: node.steps > 1 ? `generate ${node.steps} steps` : "trace", kind: "control" }
  }
}

const edges = (graph: Graph.Graph): ReadonlyArray<readonly [number, number]> =>
  Graph.flatten(graph.nodes).flatMap((n) => Graph.dependencies(n).map((d) => [d, n.id] as const))

/** Text inside a double-quoted DOT label. */
const escapeDot = (s: string) => s.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n")

/** Text inside a double-quoted Mermaid label. */
const escapeMermaid = (s: string) =>
  s.replace(/&/g, "#amp;").replace(/"/g, "#quot;").replace(/</g, "#lt;").replace(/>/g, "#gt;").replace(/\n/g, " ")

/** The max invoke index a graph's nodes use, plus one (sessions hold several traces). */
const invokesOf = (graph: Graph.Graph): number =>
  Math.max(graph.invokes, ...Graph.flatten(graph.nodes).map((n) => (n._tag === "Hook" || n._tag === "Set" ? n.ref.invoke + 1 : 0)))

/**
 * A Mermaid flowchart of a graph (paste into any Mermaid renderer).
 *
 * @example
 * Picture.toMermaid(model.record(prompt, fn).graph)
 *
 * @since 0.1.0
 */
export const toMermaid = (graph: Graph.Graph): string => {
  const lines = ["flowchart TD"]
  const classes = new Map<string, Array<string>>()
  const invokes = invokesOf(graph)
  const controls: Array<string> = []
  const node = (n: Graph.Node, indent: string) => {
    const { label, kind } = describe(n, invokes)
    const text = escapeMermaid(`%${n.id} ${label}`)
    const box = kind === "read" ? `n${n.id}[/"${text}"/]` : kind === "set" ? `n${n.id}[["${text}"]]` : kind === "control" ? `n${n.id}{"${text}"}` : `n${n.id}["${text}"]`
    lines.push(indent + box)
    classes.set(kind, [...(classes.get(kind) ?? []), `n${n.id}`])
  }
  const walk = (list: ReadonlyArray<Graph.Node>, indent: string) => {
    for (const n of list) {
      node(n, indent)
      const bodies: ReadonlyArray<readonly [string, ReadonlyArray<Graph.Node>]> =
        n._tag === "Cond" ? [["then", n.then], ["else", n.otherwise]] : n._tag === "Iter" || n._tag === "Trace" ? [["body", n.body]] : []
      for (const [name, body] of bodies) {
        if (body.length === 0) continue
        lines.push(`${indent}subgraph s${n.id}_${name}["%${n.id} ${name}"]`)
        walk(body, indent + "  ")
        lines.push(`${indent}end`)
        controls.push(`  n${n.id} -.-> s${n.id}_${name}`)
      }
    }
  }
  walk(graph.nodes, "  ")
  for (const [from, to] of edges(graph)) lines.push(`  n${from} --> n${to}`)
  lines.push(...controls)
  const results = Graph.resultRefs(graph.result)
  if (results.length > 0) {
    lines.push(`  result(["result"])`)
    for (const r of results) lines.push(`  n${r} -.-> result`)
  }
  const styles: Record<Shape["kind"], string> = {
    read: "fill:#dbeafe,stroke:#1d4ed8",
    set: "fill:#fee2e2,stroke:#b91c1c",
    op: "fill:#f3f4f6,stroke:#374151",
    value: "fill:#fef9c3,stroke:#a16207",
    control: "fill:#ede9fe,stroke:#6d28d9",
    stop: "fill:#fecaca,stroke:#7f1d1d"
  }
  for (const [kind, ids] of classes) {
    lines.push(`  classDef ${kind} ${styles[kind as Shape["kind"]]}`)
    lines.push(`  class ${ids.join(",")} ${kind}`)
  }
  return lines.join("\n")
}

/**
 * A Graphviz DOT picture of a graph (`dot -Tsvg graph.dot`).
 *
 * @example
 * fs.writeFileSync("trace.dot", Picture.toDot(graph))
 *
 * @since 0.1.0
 */
export const toDot = (graph: Graph.Graph): string => {
  const lines = ["digraph intervention {", "  rankdir=TB;", "  compound=true;", '  node [fontname="Helvetica", fontsize=11];']
  const invokes = invokesOf(graph)
  const controls: Array<string> = []
  const style: Record<Shape["kind"], string> = {
    read: 'shape=parallelogram, style=filled, fillcolor="#dbeafe", color="#1d4ed8"',
    set: 'shape=box, peripheries=2, style=filled, fillcolor="#fee2e2", color="#b91c1c"',
    op: 'shape=box, style="rounded,filled", fillcolor="#f3f4f6"',
    value: 'shape=note, style=filled, fillcolor="#fef9c3"',
    control: 'shape=diamond, style=filled, fillcolor="#ede9fe"',
    stop: 'shape=octagon, style=filled, fillcolor="#fecaca"'
  }
  const walk = (list: ReadonlyArray<Graph.Node>, indent: string) => {
    for (const n of list) {
      const { label, kind } = describe(n, invokes)
      lines.push(`${indent}n${n.id} [label="%${n.id} ${escapeDot(label)}", ${style[kind]}];`)
      const bodies: ReadonlyArray<readonly [string, ReadonlyArray<Graph.Node>]> =
        n._tag === "Cond" ? [["then", n.then], ["else", n.otherwise]] : n._tag === "Iter" || n._tag === "Trace" ? [["body", n.body]] : []
      for (const [name, body] of bodies) {
        if (body.length === 0) continue
        lines.push(`${indent}subgraph cluster_${n.id}_${name} {`, `${indent}  label="%${n.id} ${name}"; style=dashed;`)
        walk(body, indent + "  ")
        lines.push(`${indent}}`)
        // the control node points at its body
        controls.push(`  n${n.id} -> n${body[0].id} [lhead=cluster_${n.id}_${name}, style=dotted];`)
      }
    }
  }
  walk(graph.nodes, "  ")
  // top-level steps run in order: keep them in order on the page
  for (let k = 0; k + 1 < graph.nodes.length; k++) lines.push(`  n${graph.nodes[k].id} -> n${graph.nodes[k + 1].id} [style=invis, weight=10];`)
  lines.push(...controls)
  for (const [from, to] of edges(graph)) lines.push(`  n${from} -> n${to};`)
  const results = Graph.resultRefs(graph.result)
  if (results.length > 0) {
    lines.push('  result [label="result", shape=doublecircle, style=filled, fillcolor="#dcfce7"];')
    for (const r of results) lines.push(`  n${r} -> result [style=dashed];`)
  }
  lines.push("}")
  return lines.join("\n")
}

/**
 * A module tree as a Mermaid flowchart (one box per module, with its type).
 *
 * @since 0.1.0
 */
export const treeToMermaid = (root: TreeNode): string => {
  const lines = ["flowchart LR"]
  const walk = (m: TreeNode, name: string, id: string) => {
    lines.push(`  ${id}["${escapeMermaid(name === "" ? m.type : `${name}: ${m.type}`)}"]`)
    folded(m).forEach(([label, c], i) => {
      walk(c, label, `${id}_${i}`)
      lines.push(`  ${id} --> ${id}_${i}`)
    })
  }
  walk(root, root.name, "m")
  return lines.join("\n")
}

/** Children, with runs of identical numbered ones (decoder layers) folded as `(0-4): 5 x`. */
const folded = (m: TreeNode): ReadonlyArray<readonly [string, TreeNode]> => {
  const out: Array<readonly [string, TreeNode]> = []
  const shape = (t: TreeNode): string => `${t.type}(${t.children.map((c) => `${c.name}:${shape(c)}`).join(",")})`
  let i = 0
  while (i < m.children.length) {
    let j = i + 1
    if (/^\d+$/.test(m.children[i].name)) {
      while (j < m.children.length && /^\d+$/.test(m.children[j].name) && shape(m.children[j]) === shape(m.children[i])) j++
    }
    out.push([j - i > 1 ? `(${m.children[i].name}-${m.children[j - 1].name}) ${j - i} x` : m.children[i].name, m.children[i]])
    i = j
  }
  return out
}

/**
 * A module tree as Graphviz DOT.
 *
 * @since 0.1.0
 */
export const treeToDot = (root: TreeNode): string => {
  const lines = ["digraph modules {", "  rankdir=LR;", "  ordering=out;", '  node [shape=box, style="rounded,filled", fillcolor="#f3f4f6", fontname="Helvetica", fontsize=11];']
  const walk = (m: TreeNode, name: string, id: string) => {
    lines.push(`  ${id} [label="${escapeDot(name === "" ? m.type : `${name}: ${m.type}`)}"];`)
    folded(m).forEach(([label, c], i) => {
      walk(c, label, `${id}_${i}`)
      lines.push(`  ${id} -> ${id}_${i};`)
    })
  }
  walk(root, root.name, "m")
  lines.push("}")
  return lines.join("\n")
}

/**
 * The parts of a module the tree pictures read (`ModuleTree.Module` fits).
 *
 * @since 0.1.0
 */
export interface TreeNode {
  readonly name: string
  readonly type: string
  readonly children: ReadonlyArray<TreeNode>
}
