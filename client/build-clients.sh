#!/usr/bin/env bash
# Builds the generated Go and Java clients, their examples and the Go load generator from protos/,
# with protoc and the plugins Debian bookworm ships; installs those packages first when missing (as root).
# Out: build/clients/bin/{lookalike-example-go,lookalike-loadgen,lookalike-example-java}.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${LOOKALIKE_CLIENTS_OUT:-$ROOT/build/clients}
PROTO=lookalike/v1/lookalike.proto
# The retry policy every client loads; both clients carry a copy made here, never a checked-in one.
SERVICE_CONFIG=lookalike/v1/service_config.json
# Go builds in GOPATH mode from Debian's sources. The golang/protobuf 1.5 package is named on purpose:
# with the 1.3 one apt would otherwise pick (golang-goprotobuf-dev), the client compiles and then fails
# on its first response.
GO_PACKAGES=(golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev
             golang-github-golang-protobuf-1-5-dev golang-google-protobuf-dev)
# libgrpc-java does not pull in netty, guava or perfmark; generated code needs javax.annotation on JDK 17;
# gson reads the service config. TLS needs ALPN, which Debian's netty offers only through OpenSSL
# (netty-tcnative): its JDK-provider ALPN classes are left out of the package.
JAVA_PACKAGES=(protobuf-compiler libgrpc-java protobuf-compiler-grpc-java-plugin libprotobuf-java libnetty-java
               libguava-java libperfmark-java libgeronimo-annotation-1.3-spec-java libgoogle-gson-java
               libnetty-tcnative-java libnetty-tcnative-jni)

missing=()
for package in "${GO_PACKAGES[@]}" "${JAVA_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing the Debian packages the Go and Java clients are built with: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
  else
    echo "the Go and Java clients need these Debian packages: ${missing[*]}; as root: apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
command -v javac >/dev/null || { echo "the Java client needs a JDK (javac): apt-get install default-jdk-headless" >&2; exit 1; }

mkdir -p "$OUT/bin" "$OUT/go/src" "$OUT/java/gen" "$OUT/java/classes"

# Go: generated stubs in $OUT/go, our wrapper and programs in client/go, the libraries in Debian's GOPATH.
protoc -I "$ROOT/protos" --go_out="$OUT/go/src" --go-grpc_out="$OUT/go/src" "$ROOT/protos/$PROTO"
mkdir -p "$OUT/go/src/lookalike/serviceconfig"
cp "$ROOT/protos/$SERVICE_CONFIG" "$OUT/go/src/lookalike/serviceconfig/service_config.json"
cat > "$OUT/go/src/lookalike/serviceconfig/serviceconfig.go" <<'GO'
// Package serviceconfig embeds protos/lookalike/v1/service_config.json (copied by build-clients.sh).
package serviceconfig

import _ "embed"

// JSON is the gRPC service config (retry policy) every lookalike client loads.
//
//go:embed service_config.json
var JSON string
GO
export GOPATH="$OUT/go:$ROOT/client/go:/usr/share/gocode" GO111MODULE=off GOCACHE="$OUT/go-cache" GOFLAGS=
go vet lookalike/client lookalike/cmd/...
go build -o "$OUT/bin/lookalike-example-go" lookalike/cmd/lookalike-example
go build -o "$OUT/bin/lookalike-loadgen" lookalike/cmd/lookalike-loadgen

# Java: javac against the jars Debian installs in /usr/share/java.
protoc -I "$ROOT/protos" --java_out="$OUT/java/gen" --plugin=protoc-gen-grpc-java=/usr/bin/grpc_java_plugin \
  --grpc-java_out="$OUT/java/gen" "$ROOT/protos/$PROTO"
jars=(grpc-api grpc-core grpc-context grpc-netty grpc-protobuf grpc-protobuf-lite grpc-stub protobuf guava
      perfmark-api geronimo-annotation-1.3-spec netty-buffer netty-codec netty-codec-http netty-codec-http2
      netty-common netty-handler netty-resolver netty-transport gson netty-tcnative)
classpath=""
for jar in "${jars[@]}"; do
  [ -f "/usr/share/java/$jar.jar" ] || { echo "missing /usr/share/java/$jar.jar" >&2; exit 1; }
  classpath="$classpath:/usr/share/java/$jar.jar"
done
rm -rf "$OUT/java/classes" && mkdir -p "$OUT/java/classes"
javac -nowarn -encoding UTF-8 -d "$OUT/java/classes" -cp "${classpath#:}" \
  $(find "$OUT/java/gen" "$ROOT/client/java/src" -name '*.java')
mkdir -p "$OUT/java/classes/$(dirname "$SERVICE_CONFIG")"
cp "$ROOT/protos/$SERVICE_CONFIG" "$OUT/java/classes/$SERVICE_CONFIG"   # a class-path resource
# Netty looks for the OpenSSL glue as libnetty_tcnative.so, Debian installs it as libnetty-tcnative.so, and the
# library checks the name it was loaded by (a symbolic link will not do): a copy under Netty's name.
mkdir -p "$OUT/java/native"
cp "$(dpkg -L libnetty-tcnative-jni | grep '/libnetty-tcnative\.so$' | head -1)" "$OUT/java/native/libnetty_tcnative.so"
cat > "$OUT/bin/lookalike-example-java" <<LAUNCHER
#!/bin/sh
exec java -Djava.library.path="$OUT/java/native" -cp "$OUT/java/classes$classpath" com.lookalike.client.Example "\$@"
LAUNCHER
chmod +x "$OUT/bin/lookalike-example-java"
echo "built: $(ls "$OUT/bin" | tr '\n' ' ')"
