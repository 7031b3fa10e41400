"""Confluent's own Avro serde (confluent-kafka's AvroSerializer / AvroDeserializer and its
Schema Registry client) on the other side of vigil, for tests/schema_registry.rs.

  produce BROKERS TOPIC REGISTRY EVENTS.jsonl AVSC
      Each event (the dataset's JSON) is written in the Confluent wire format with one of four
      writer schemas in turn: the shipped one, and the shipped one with a field added first, in
      the middle or last, each registered under TOPIC-value as a producer evolving its schema
      would. Then two poison records: a datum framed with a schema id the registry never gave,
      and one cut short by a byte. Prints {"unknown_id": ..., "truncated": ...} (their keys).

  read-alerts BROKERS TOPIC REGISTRY COUNT
      Reads COUNT alerts from TOPIC with AvroDeserializer (the writer schema fetched by the id
      in each record) and prints each as one JSON line.
"""

import copy
import json
import struct
import sys
import time

from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

ADDED = [
    # (position, field): every added field has a default, as the registry's default
    # compatibility rule (BACKWARD) requires.
    (0, {"name": "SourceSystem", "type": "string", "default": "core"}),
    # A double right before TransactionDuration: read positionally, its bytes would pass for it.
    ("TransactionDuration", {"name": "RiskScore", "type": "double", "default": 0.0}),
    (None, {"name": "Tags", "type": {"type": "array", "items": "string"}, "default": []}),
]
VALUES = {"SourceSystem": "branch-7", "RiskScore": 0.25, "Tags": ["a", "b"]}


def writer_schemas(avsc):
    base = json.load(open(avsc))
    schemas = [base]
    for at, field in ADDED:
        s = copy.deepcopy(base)
        names = [f["name"] for f in s["fields"]]
        i = len(names) if at is None else names.index(at) if isinstance(at, str) else at
        s["fields"].insert(i, field)
        schemas.append(s)
    return [json.dumps(s) for s in schemas]


def record(event, schema):
    r = {k: v for k, v in event.items() if k != "IP Address"}
    r["IPAddress"] = event["IP Address"]
    r.setdefault("PreviousTransactionDate", None)
    for f in json.loads(schema)["fields"]:
        if f["name"] in VALUES:
            r[f["name"]] = VALUES[f["name"]]
    return r


def produce(brokers, topic, registry, events_path, avsc):
    client = SchemaRegistryClient({"url": registry})
    writers = [
        (s, AvroSerializer(client, s, conf={"auto.register.schemas": True}))
        for s in writer_schemas(avsc)
    ]
    ctx = SerializationContext(topic, MessageField.VALUE)
    producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True})
    events = [json.loads(line) for line in open(events_path)]
    for i, event in enumerate(events):
        schema, serialize = writers[i % len(writers)]
        value = serialize(record(event, schema), ctx)
        producer.produce(topic, key=event["AccountID"], value=value)
        producer.poll(0)
    schema, serialize = writers[0]
    base = serialize(record(events[0], schema), ctx)
    unknown = b"\x00" + struct.pack(">I", 987654) + base[5:]
    producer.produce(topic, key="poison-unknown-id", value=unknown)
    producer.produce(topic, key="poison-truncated", value=base[:-1])
    if producer.flush(30) != 0:
        sys.exit("not every record was acknowledged")
    print(json.dumps({"unknown_id": "poison-unknown-id", "truncated": "poison-truncated"}))


def read_alerts(brokers, topic, registry, count):
    deserialize = AvroDeserializer(SchemaRegistryClient({"url": registry}))
    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": f"confluent-reader-{topic}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    deadline = time.time() + 60
    n = 0
    while n < count and time.time() < deadline:
        msg = consumer.poll(1.0)
        if msg is None:
            continue
        if msg.error():
            sys.exit(f"reading {topic}: {msg.error()}")
        alert = deserialize(msg.value(), SerializationContext(topic, MessageField.VALUE))
        print(json.dumps(alert))
        n += 1
    consumer.close()


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "produce":
        produce(*args)
    elif command == "read-alerts":
        read_alerts(args[0], args[1], args[2], int(args[3]))
    else:
        sys.exit(f"unknown command {command}")
