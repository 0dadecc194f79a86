# The MLflow tracking server with the drivers the stack needs (Postgres, S3).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/* \
 && pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.10 boto3
EXPOSE 5000
