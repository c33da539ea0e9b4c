"""The reference the performance issue sets switchyard against: the demo's three roles as a
careful Python engineer writes them. confluent-kafka (librdkafka), raw image bytes with headers,
batched polling, ONNX Runtime at batch 64, one process per role, over the same Kafka broker.

    careful_pipeline.py consumer   BOOTSTRAP RUN COUNT       # prints one JSON line at the end
    careful_pipeline.py classifier BOOTSTRAP MODEL
    careful_pipeline.py producer   BOOTSTRAP IMAGES LABELS RUN COUNT

The consumer and the classifier print "ready" once their group has given them partitions, so
the caller starts the producer after both. Delivery is at-least-once (offsets are committed
automatically after processing), and the consumer counts each request id once.
"""

import gzip
import json
import sys
import time

import numpy as np
from confluent_kafka import Consumer, Producer

REQUESTS, PREDICTIONS = "requests", "predictions"
BATCH = 64


def idx(path):
    data = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def consumer_for(bootstrap, group, topic):
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            # As the README tells switchyard's users for this broker: it answers an empty
            # fetch only after fetch.wait.max.ms.
            "fetch.wait.max.ms": 1,
        }
    )
    consumer.subscribe([topic], on_assign=lambda *_: print("ready", flush=True))
    return consumer


def producer_for(bootstrap):
    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 2})


def produce(bootstrap, images, labels, run, count):
    pixels, truth = idx(images), idx(labels)
    producer = producer_for(bootstrap)
    for i in range(count):
        image = i % len(pixels)
        headers = {
            "request-id": f"{run}-{i}",
            "label": str(int(truth[image])),
            "sent-at": f"{time.time() * 1000:.3f}",
        }
        while True:
            try:
                producer.produce(REQUESTS, pixels[image].tobytes(), headers=headers)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush()


def classify(bootstrap, model):
    import onnxruntime

    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    consumer = consumer_for(bootstrap, "careful-classifier", REQUESTS)
    producer = producer_for(bootstrap)
    while True:
        messages = [m for m in consumer.consume(BATCH, 0.1) if m.error() is None]
        if not messages:
            continue
        images = np.frombuffer(b"".join(m.value() for m in messages), np.uint8)
        batch = images.reshape(len(messages), 1, 28, 28).astype(np.float32) / 255.0
        logits = session.run(None, {name: batch})[0]
        for message, scores in zip(messages, logits):
            headers = dict((k, v.decode()) for k, v in message.headers() or [])
            prediction = {
                "request_id": headers.get("request-id"),
                "class": int(scores.argmax()),
                "label": int(headers["label"]) if "label" in headers else None,
                "sent_at_ms": float(headers["sent-at"]) if "sent-at" in headers else None,
            }
            producer.produce(PREDICTIONS, json.dumps(prediction).encode())
        producer.poll(0)


def consume(bootstrap, run, count):
    consumer = consumer_for(bootstrap, f"careful-consumer-{run}", PREDICTIONS)
    seen, correct, latencies = set(), 0, []
    first_sent, last_received = None, None
    while len(seen) < count:
        for message in consumer.consume(BATCH, 0.1):
            if message.error() is not None:
                continue
            received = time.time() * 1000
            prediction = json.loads(message.value())
            request = prediction["request_id"] or ""
            if not request.startswith(f"{run}-") or request in seen:
                continue
            seen.add(request)
            correct += prediction["class"] == prediction["label"]
            sent = prediction["sent_at_ms"]
            latencies.append(received - sent)
            first_sent = sent if first_sent is None else min(first_sent, sent)
            last_received = received
    latencies.sort()
    seconds = (last_received - first_sent) / 1000
    print(
        json.dumps(
            {
                "images": count,
                "predictions": len(seen),
                "images_per_s": len(seen) / seconds,
                "p50_ms": latencies[len(latencies) // 2],
                "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
                "accuracy": correct / len(seen),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    role, bootstrap, *rest = sys.argv[1:]
    if role == "producer":
        produce(bootstrap, rest[0], rest[1], rest[2], int(rest[3]))
    elif role == "classifier":
        classify(bootstrap, rest[0])
    elif role == "consumer":
        consume(bootstrap, rest[0], int(rest[1]))
    else:
        sys.exit(f"unknown role {role!r}: producer, classifier or consumer")
