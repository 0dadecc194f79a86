#!/usr/bin/env node
'use strict';
/*
 * Writes Rollstream events from Node with Confluent's own JavaScript clients, the way a
 * producer in any language must: Avro in the Confluent wire format through the schema
 * registry (the latest schema registered under <topic>-value), keyed by rollout_id,
 * idempotent, with the Java-compatible murmur2 partitioner.
 *
 *   node produce.js <bootstrap> <registryUrl> <recordsFile>
 *
 * recordsFile: JSON lines {"topic", "key", "value"}; values as plain JSON (unions of null and
 * one type unwrapped, enums as strings, longs as numbers). Prints one JSON line per record
 * written: {"topic", "key", "partition", "offset"}. Exit 0 = all written, 1 = error, 2 = usage.
 */
const fs = require('fs');
const RdKafka = require('@confluentinc/kafka-javascript');
const { Kafka, logLevel } = RdKafka.KafkaJS;
const { SchemaRegistryClient, AvroSerializer, SerdeType } = require('@confluentinc/schemaregistry');

const [bootstrap, registryUrl, recordsFile] = process.argv.slice(2);
if (!bootstrap || !registryUrl || !recordsFile) {
  process.stderr.write('usage: node produce.js <bootstrap> <registryUrl> <recordsFile>\n');
  process.exit(2);
}

async function main() {
  const records = fs.readFileSync(recordsFile, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));
  const serializer = new AvroSerializer(
    new SchemaRegistryClient({ baseURLs: [registryUrl] }), SerdeType.VALUE, { useLatestVersion: true });
  const producer = new Kafka({}).producer({
    'bootstrap.servers': bootstrap,
    // The partitioner every Rollstream producer must use (the KafkaJS layer defaults to it too).
    'partitioner': 'murmur2_random',
    'enable.idempotence': true,
    'acks': -1,
    'log_level': 4,
  });
  await producer.connect();
  try {
    for (const { topic, key, value } of records) {
      const bytes = await serializer.serialize(topic, value);
      const [meta] = await producer.send({ topic, messages: [{ key, value: bytes }] });
      process.stdout.write(JSON.stringify({ topic, key, partition: meta.partition, offset: String(meta.baseOffset) }) + '\n');
    }
  } finally {
    await producer.disconnect();
  }
}

main().then(() => process.exit(0), (e) => { process.stderr.write(`produce.js: ${e && e.stack || e}\n`); process.exit(1); });
