/**
 * The `nnsight-ts` command line:
 *
 * - `nnsight-ts serve --model <dir | hub id | file.onnx | key=...> [--model ...] --port N`
 *   hosts models behind the remote API until interrupted. API keys come
 *   from `--keys <file>` (JSON `{ "keys": [{ "id", "hash", "limits"? }] }`)
 *   and the environment (`NNSIGHT_API_KEYS="id:key,..."`,
 *   `NNSIGHT_API_KEY_HASHES="id:hash,..."`); with none, a key is generated
 *   for the run and printed.
 * - `nnsight-ts serve --database postgres://... [--role both|front|runner]`
 *   runs on the cluster instead (see `Cluster`): jobs and their messages in
 *   PostgreSQL, model workers sharded across runner processes
 *   (`--runner-address host:port`, distinct per runner), HTTP fronts on any
 *   number of machines. The URL may come from `NNSIGHT_DATABASE_URL`.
 * - `nnsight-ts keygen --id alice` prints a new key and its key-file entry.
 *
 * @example
 * npx nnsight-ts serve --model models/stories260K --port 8470
 *
 * @since 0.1.0
 */
import { existsSync } from "node:fs"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { NodeRuntime, NodeServices } from "@effect/platform-node"
import { Config, Console, Context, Effect, Layer, Option } from "effect"
import { Command, Flag } from "effect/cli"
import { HttpServer } from "effect/http"
import { LanguageModel } from "../models/LanguageModel.js"
import { NNsight, type TracedModel } from "../models/NNsight.js"
import * as Cluster from "./Cluster.js"
import type * as Protocol from "./Protocol.js"
import * as Server from "./Server.js"

/**
 * How a `--model` value names a model: `key=source` or just `source`
 * (key: the base name of a folder or file that exists, else the hub id).
 *
 * @example
 * Cli.parseModel("tiny=models/stories260K") // { key: "tiny", source: "models/stories260K" }
 *
 * @since 0.1.0
 */
export const parseModel = (spec: string): { readonly key: string; readonly source: string } => {
  const eq = spec.indexOf("=")
  if (eq > 0) return { key: spec.slice(0, eq), source: spec.slice(eq + 1) }
  const base = path.basename(spec.replace(/[\\/]+$/, ""))
  const isPathLike = spec.startsWith(".") || spec.startsWith("/") || spec.endsWith(".onnx") || existsSync(spec)
  return { key: isPathLike ? base.replace(/\.onnx$/, "") : spec, source: spec }
}

/**
 * Loads a model: an `.onnx` file as `NNsight`, a folder or hub id as `LanguageModel`.
 *
 * @since 0.1.0
 */
export const loadModel = async (source: string): Promise<TracedModel<any>> =>
  source.endsWith(".onnx") ? NNsight.load(source) : LanguageModel.load(source)

/**
 * Reads a key file: `{ "keys": [{ "id": "alice", "hash": "scrypt$...", "limits": { ... } }] }`.
 *
 * @since 0.1.0
 */
export const readKeyFile = async (file: string): Promise<ReadonlyArray<Server.KeyEntry>> => {
  const json = JSON.parse(await fs.readFile(file, "utf8")) as { keys?: ReadonlyArray<Server.KeyEntry> }
  const keys = json.keys ?? []
  for (const k of keys) {
    if (typeof k.id !== "string" || typeof k.hash !== "string") throw new Error(`${file}: every key needs an "id" and a "hash" (see nnsight-ts keygen)`)
  }
  return keys
}

const models = Flag.String("model").pipe(
  Flag.withAlias("m"),
  Flag.withDescription("A model to host: a folder (config.json, tokenizer.json, ONNX), a hub id, an .onnx file, or key=source"),
  Flag.atLeast(1)
)

const loadModels = (sources: ReadonlyArray<string>) =>
  Effect.acquireRelease(
    Effect.promise(async () => {
      const out: Array<{ key: string; model: TracedModel<any> }> = []
      for (const s of sources.map(parseModel)) out.push({ key: s.key, model: await loadModel(s.source) })
      return out
    }),
    (ms) => Effect.promise(() => Promise.all(ms.map((m) => m.model.close())).then(() => undefined))
  )

/**
 * Parses `host:port` (`[v6]:port` too).
 *
 * @example
 * Cli.parseAddress("10.0.0.5:34431") // { host: "10.0.0.5", port: 34431 }
 *
 * @since 0.1.0
 */
export const parseAddress = (s: string): { readonly host: string; readonly port: number } => {
  const colon = s.lastIndexOf(":")
  const port = Number(s.slice(colon + 1))
  if (colon <= 0 || !Number.isSafeInteger(port) || port <= 0 || port > 65535) throw new Error(`expected host:port, got ${JSON.stringify(s)}`)
  return { host: s.slice(0, colon).replace(/^\[(.*)\]$/, "$1"), port }
}

/** Where a database URL points, without its credentials. */
const describeDatabase = (url: string): string => {
  try {
    const u = new URL(url)
    return `${u.hostname}${u.port === "" ? "" : `:${u.port}`}${u.pathname}`
  } catch {
    return "the database"
  }
}

interface ServeFlags {
  readonly models: ReadonlyArray<string>
  readonly port: number
  readonly host: string
  readonly keys: Option.Option<string>
  readonly coBatch: boolean
  readonly maxBodyMb: number
  readonly concurrentJobs: Option.Option<number>
  readonly wallTimeS: Option.Option<number>
  readonly logRequests: boolean
  readonly role: Cluster.Role
  readonly runnerAddress: string
  readonly runnerListen: Option.Option<string>
  readonly leaseSeconds: number
  readonly maxAttempts: number
}

/** The API keys: the environment's and the key file's, or a fresh one printed for this run. */
const keysOf = (flags: ServeFlags) =>
  Effect.gen(function*() {
    const keys: Array<Server.KeyEntry | Server.PlainKey> = [...Server.keysFromEnv()]
    if (Option.isSome(flags.keys)) {
      const file = flags.keys.value
      keys.push(...(yield* Effect.promise(() => readKeyFile(file))))
    }
    if (keys.length === 0) {
      const key = Server.generateKey()
      keys.push({ id: "dev", key })
      yield* Console.log(`no API keys configured (--keys or NNSIGHT_API_KEYS): this run accepts the key\n  ${key}`)
    }
    return keys
  })

/** The HTTP front's options the flags set (default per-key limits included). */
const httpOptionsOf = (flags: ServeFlags) => ({
  limits: {
    ...(Option.isSome(flags.concurrentJobs) ? { concurrentJobs: flags.concurrentJobs.value } : {}),
    ...(Option.isSome(flags.wallTimeS) ? { wallTimeMs: flags.wallTimeS.value * 1000 } : {})
  } satisfies Partial<Protocol.Limits>,
  port: flags.port,
  host: flags.host,
  coBatch: flags.coBatch,
  maxBodyBytes: flags.maxBodyMb * 1024 * 1024,
  logRequests: flags.logRequests
})

/** `serve --database`: a front, a runner, or both, on the cluster. */
const serveCluster = (flags: ServeFlags, database: string) =>
  Effect.gen(function*() {
    const address = yield* Effect.try(() => parseAddress(flags.runnerAddress)).pipe(Effect.orDie)
    const cluster: Cluster.ClusterOptions = {
      database,
      role: flags.role,
      runner: { ...address, ...(Option.isSome(flags.runnerListen) ? { listenHost: flags.runnerListen.value } : {}) },
      leaseMs: Math.round(flags.leaseSeconds * 1000),
      maxAttempts: flags.maxAttempts
    }
    const where = describeDatabase(database)
    if (flags.role === "runner") {
      const loaded = yield* loadModels(flags.models)
      yield* Layer.build(Cluster.layerRunner({ ...cluster, models: loaded, coBatch: flags.coBatch }))
      yield* Console.log(`nnsight-ts runner ${Cluster.runnerName(cluster)} hosting ${loaded.map((m) => m.key).join(", ")} (jobs in ${where})`)
      return yield* Effect.never
    }
    const keys = yield* keysOf(flags)
    const loaded = yield* loadModels(flags.models)
    const context = yield* Layer.build(Cluster.layer({ ...cluster, ...httpOptionsOf(flags), models: loaded, keys }))
    const httpAddress = Context.get(context, HttpServer.HttpServer).address
    const port = httpAddress._tag === "UnixPathAddress" ? 0 : httpAddress.port
    const runs = flags.role === "both" ? `, runner ${Cluster.runnerName(cluster)}` : ""
    yield* Console.log(`nnsight-ts serving ${loaded.map((m) => m.key).join(", ")} on http://${flags.host}:${port} (cluster ${flags.role}${runs}; jobs in ${where})`)
    return yield* Effect.never
  }).pipe(Effect.scoped)

const serve = Command.make(
  "serve",
  {
    models,
    port: Flag.Int("port").pipe(Flag.withAlias("p"), Flag.withDescription("Port to listen on"), Flag.withDefault(8470)),
    host: Flag.String("host").pipe(Flag.withDescription("Interface to listen on"), Flag.withDefault("127.0.0.1")),
    keys: Flag.String("keys").pipe(Flag.withDescription("Key file (JSON, hashed keys; see keygen)"), Flag.optional),
    coBatch: Flag.Boolean("co-batch").pipe(
      Flag.withDescription("Run concurrent compatible trace requests as one batched forward pass"),
      Flag.withDefault(true)
    ),
    maxBodyMb: Flag.Int("max-body-mb").pipe(Flag.withDescription("Largest request body, MiB"), Flag.withDefault(64)),
    concurrentJobs: Flag.Int("max-jobs").pipe(Flag.withDescription("Default limit of unfinished jobs per key"), Flag.optional),
    wallTimeS: Flag.Int("max-seconds").pipe(Flag.withDescription("Default wall-time limit of one run, seconds"), Flag.optional),
    logRequests: Flag.Boolean("log-requests").pipe(Flag.withDescription("Log every HTTP request"), Flag.withDefault(false)),
    database: Flag.String("database").pipe(
      Flag.withDescription("PostgreSQL URL: run on the cluster (jobs in the database, workers on runner processes); default NNSIGHT_DATABASE_URL"),
      Flag.withFallbackConfig(Config.String("NNSIGHT_DATABASE_URL")),
      Flag.optional
    ),
    role: Flag.Literals("role", ["both", "front", "runner"]).pipe(
      Flag.withDescription("With --database: serve the HTTP API (front), run jobs (runner), or both"),
      Flag.withDefault("both" as const)
    ),
    runnerAddress: Flag.String("runner-address").pipe(
      Flag.withDescription("With --database: host:port where other processes reach this runner (one per runner)"),
      Flag.withDefault("127.0.0.1:34431")
    ),
    runnerListen: Flag.String("runner-listen").pipe(Flag.withDescription("Interface the runner listens on (default: the address's host)"), Flag.optional),
    leaseSeconds: Flag.Finite("lease-seconds").pipe(
      Flag.withDescription("With --database: how long a silent runner keeps its shards (its jobs move on after about this long); the same in every process"),
      Flag.withDefault(20)
    ),
    maxAttempts: Flag.Int("max-attempts").pipe(Flag.withDescription("With --database: starts of a job before it is reported failed"), Flag.withDefault(3))
  },
  (flags) =>
    Effect.gen(function*() {
      if (Option.isSome(flags.database) && flags.database.value.trim() !== "") return yield* serveCluster(flags, flags.database.value)
      const keys = yield* keysOf(flags)
      const loaded = yield* loadModels(flags.models)
      const context = yield* Layer.build(Server.layer({ ...httpOptionsOf(flags), models: loaded, keys }))
      const address = Context.get(context, HttpServer.HttpServer).address
      const port = address._tag === "UnixPathAddress" ? 0 : address.port
      yield* Console.log(`nnsight-ts serving ${loaded.map((m) => m.key).join(", ")} on http://${flags.host}:${port} (co-batching ${flags.coBatch ? "on" : "off"})`)
      return yield* Effect.never
    }).pipe(Effect.scoped)
).pipe(Command.withDescription("Host models for remote execution"))

const keygen = Command.make(
  "keygen",
  {
    id: Flag.String("id").pipe(Flag.withDescription("Who the key is for (owns its jobs)")),
    scheme: Flag.Literals("scheme", ["scrypt", "sha256"]).pipe(Flag.withDefault("scrypt" as const))
  },
  (flags) =>
    Effect.gen(function*() {
      const key = Server.generateKey()
      const hash = yield* Effect.promise(() => Server.hashKey(key, flags.scheme))
      yield* Console.log(`key (give it to ${flags.id}; it is not stored):\n  ${key}\nkey-file entry:\n  ${JSON.stringify({ id: flags.id, hash })}`)
    })
).pipe(Command.withDescription("Make an API key and its hashed key-file entry"))

/**
 * The `nnsight-ts` command.
 *
 * @since 0.1.0
 */
export const command = Command.make("nnsight-ts").pipe(
  Command.withDescription("nnsight for TypeScript: remote execution server"),
  Command.withSubcommands([serve, keygen])
)

/**
 * Runs the command line (arguments without `node` and the script).
 *
 * @example
 * Cli.main(process.argv.slice(2))
 *
 * @since 0.1.0
 */
export const main = (args: ReadonlyArray<string>): void =>
  Command.runWith(command, { version: "0.1.0" })(args).pipe(Effect.provide(NodeServices.layer), NodeRuntime.runMain)
