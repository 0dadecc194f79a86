#!/usr/bin/env node
'use strict';
/*
 * Reads records that Rollstream wrote, with Confluent's own JavaScript clients, and prints
 * one JSON line per record: {"topic", "partition", "offset", "key", "value"}.
 *
 *   node consume.js <bootstrap> <registryUrl> <topic[,topic...]> <count> [timeoutSec=60]
 *
 * Values are decoded by @confluentinc/schemaregistry's AvroDeserializer through the running
 * registry, then made JSON-safe: bytes -> base64, Maps -> objects. Avro longs (timestamps
 * included) come out as numbers; unions of null and one type are not wrapped.
 * Exit: 0 = read <count> records; 1 = error; 2 = usage; 3 = timed out.
 * Diagnostics go to stderr; stdout carries only the JSON lines.
 */
const RdKafka = require('@confluentinc/kafka-javascript');
const { Kafka, logLevel } = RdKafka.KafkaJS;
const { SchemaRegistryClient, AvroDeserializer, SerdeType } = require('@confluentinc/schemaregistry');

const [bootstrap, registryUrl, topicArg, countArg, timeoutArg] = process.argv.slice(2);
if (!bootstrap || !registryUrl || !topicArg || !countArg) {
  process.stderr.write('usage: node consume.js <bootstrap> <registryUrl> <topic[,topic...]> <count> [timeoutSec]\n');
  process.exit(2);
}
const topics = topicArg.split(',');
const count = Number.parseInt(countArg, 10);
const timeoutMs = (timeoutArg === undefined ? 60 : Number(timeoutArg)) * 1000;
const err = (msg) => process.stderr.write(`consume.js: ${msg}\n`);

// connect() waits 30 s for metadata by default, and the process cannot exit meanwhile:
// bound it by our own timeout so that a missing broker fails fast.
const connect = RdKafka.KafkaConsumer.prototype.connect;
RdKafka.KafkaConsumer.prototype.connect = function (opts, cb) {
  return connect.call(this, opts || { timeout: Math.max(1000, Math.min(30000, timeoutMs - 1000)) }, cb);
};

// The default KafkaJS-compatible logger writes to stdout, which carries our records.
const logger = {
  level: logLevel.WARN,
  setLogLevel(l) { this.level = l; },
  namespace() { return this; },
  log(l, m) { if (this.level >= l) err(`kafka: ${m}`); },
  error(m) { this.log(logLevel.ERROR, m); },
  warn(m) { this.log(logLevel.WARN, m); },
  info(m) { this.log(logLevel.INFO, m); },
  debug(m) { this.log(logLevel.DEBUG, m); },
};

function jsonSafe(v) {
  if (v === null || v === undefined) return null;
  if (typeof v === 'bigint') return v.toString();
  if (typeof v !== 'object') return v;
  if (Buffer.isBuffer(v) || v instanceof Uint8Array) return Buffer.from(v).toString('base64');
  if (Array.isArray(v)) return v.map(jsonSafe);
  const entries = v instanceof Map ? [...v.entries()] : Object.entries(v);
  return Object.fromEntries(entries.map(([k, x]) => [String(k), jsonSafe(x)]));
}

async function main() {
  const deserializer = new AvroDeserializer(
    new SchemaRegistryClient({ baseURLs: [registryUrl] }), SerdeType.VALUE, {});
  const consumer = new Kafka({ kafkaJS: { brokers: bootstrap.split(','), logger, logLevel: logLevel.WARN } })
    .consumer({ kafkaJS: { groupId: `rollstream-interop-${process.pid}-${Date.now()}`, fromBeginning: true, autoCommit: false } });
  let seen = 0;
  let finish;
  const done = new Promise((resolve) => { finish = resolve; });
  const timer = setTimeout(() => finish([3, `timed out: ${seen} of ${count} records from ${topics}`]), timeoutMs);

  await consumer.connect();
  await consumer.subscribe({ topics });
  await consumer.run({
    eachMessage: async ({ topic, partition, message }) => {
      if (seen >= count) return;
      try {
        const value = await deserializer.deserialize(topic, message.value, message.headers);
        const key = message.key == null ? null : message.key.toString('utf8');
        process.stdout.write(JSON.stringify({ topic, partition, offset: message.offset, key, value: jsonSafe(value) }) + '\n');
        if (++seen >= count) setImmediate(() => finish([0]));
      } catch (e) {
        // Throwing here would make the consumer redeliver the record forever.
        setImmediate(() => finish([1, `cannot decode ${topic}[${partition}]@${message.offset}: ${e.stack || e}`]));
      }
    },
  });
  const [code, why] = await done;
  clearTimeout(timer);
  if (why) err(why);
  logger.setLogLevel(logLevel.NOTHING);
  await Promise.race([consumer.disconnect().catch(() => {}), new Promise((r) => setTimeout(r, 5000).unref())]);
  return code;
}

main().then((code) => process.exit(code), (e) => { err(e.stack || String(e)); process.exit(1); });
