# vaultfleet: one static binary, one image for every process. The command
# picks the process: worker, scheduler, serve, dev, enqueue (see
# docker-compose.yml).
#
#   docker build -t vaultfleet .
#   docker run --rm vaultfleet --help

# Build stage: a static, reproducible binary (no cgo, no build paths).
FROM golang:1.26 AS build
WORKDIR /src
# Modules first, so that a source change does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 GOOS=linux go build -trimpath -ldflags="-s -w" -o /out/vaultfleet ./cmd/vaultfleet

# Final stage: distroless static (CA certificates for the providers' TLS,
# tzdata, /etc/passwd with nonroot), no shell, no package manager.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/vaultfleet /vaultfleet
# nonroot (65532), numeric so that runAsNonRoot checks can verify it.
USER 65532:65532
# 8080: serve and dev (API, /monitor, /metrics); 9101: worker and 9102:
# scheduler (/metrics, /healthz, /readyz). VAULTFLEET_ADDR or --addr moves
# them.
EXPOSE 8080 9101 9102
ENTRYPOINT ["/vaultfleet"]
CMD ["--help"]
