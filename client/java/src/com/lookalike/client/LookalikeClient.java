package com.lookalike.client;

import com.google.gson.Gson;
import com.google.protobuf.ByteString;
import com.lookalike.v1.Clause;
import com.lookalike.v1.EmbedRequest;
import com.lookalike.v1.EmbedResponse;
import com.lookalike.v1.Example;
import com.lookalike.v1.FindSimilarRequest;
import com.lookalike.v1.FindSimilarResponse;
import com.lookalike.v1.GetInfoRequest;
import com.lookalike.v1.GetInfoResponse;
import com.lookalike.v1.ImageSimilarityGrpc;
import com.lookalike.v1.QueryExpansion;
import com.lookalike.v1.Range;
import com.lookalike.v1.RecommendRequest;
import com.lookalike.v1.RecommendResponse;
import com.lookalike.v1.RecommendStrategy;
import com.lookalike.v1.Region;
import io.grpc.ManagedChannel;
import io.grpc.netty.GrpcSslContexts;
import io.grpc.netty.NettyChannelBuilder;
import io.netty.handler.ssl.SslContextBuilder;
import java.io.File;
import java.io.IOException;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.io.Reader;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.Arrays;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import java.util.function.Function;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * A small wrapper over the generated lookalike.v1 stubs: every call has one deadline, UNAVAILABLE (a
 * restarting or draining server) is retried by gRPC itself under the service config every lookalike
 * client loads (protos/lookalike/v1/service_config.json, a class-path resource here), and TLS and mTLS
 * are builder options.
 */
public final class LookalikeClient implements AutoCloseable {
  /** The class-path resource holding the shared service config (retry policy). */
  public static final String SERVICE_CONFIG_RESOURCE = "/lookalike/v1/service_config.json";

  private final ManagedChannel channel;
  private final ImageSimilarityGrpc.ImageSimilarityBlockingStub stub;
  private final Duration timeout;

  private LookalikeClient(ManagedChannel channel, Duration timeout) {
    this.channel = channel;
    this.stub = ImageSimilarityGrpc.newBlockingStub(channel);
    this.timeout = timeout;
  }

  /** The shared service config, as the nested maps (numbers as Double) gRPC takes. */
  @SuppressWarnings("unchecked")
  public static Map<String, ?> serviceConfig() throws IOException {
    try (InputStream in = LookalikeClient.class.getResourceAsStream(SERVICE_CONFIG_RESOURCE)) {
      if (in == null) {
        throw new IOException(SERVICE_CONFIG_RESOURCE + " is not on the class path");
      }
      Reader reader = new InputStreamReader(in, StandardCharsets.UTF_8);
      return new Gson().fromJson(reader, Map.class);
    }
  }

  public static Builder newBuilder(String target) {
    return new Builder(target);
  }

  /** How to reach the server and how patient to be. */
  public static final class Builder {
    private final String target;
    private Duration timeout = Duration.ofSeconds(10);
    private File caPem;
    private File certPem;
    private File keyPem;

    private Builder(String target) {
      this.target = target;
    }

    /** Deadline of each call, its retries included (10 s by default). */
    public Builder timeout(Duration timeout) {
      this.timeout = timeout;
      return this;
    }

    /** TLS, trusting the CA certificate in this PEM file. */
    public Builder tls(File caPem) {
      this.caPem = caPem;
      return this;
    }

    /** mTLS: this client's certificate and its PKCS#8 key, PEM files (with tls() for the server's CA). */
    public Builder clientCertificate(File certPem, File keyPem) {
      this.certPem = certPem;
      this.keyPem = keyPem;
      return this;
    }

    public LookalikeClient build() throws IOException {
      if ((certPem != null || keyPem != null) && (certPem == null || keyPem == null || caPem == null)) {
        throw new IllegalArgumentException("mTLS needs the client certificate, its key and tls(CA)");
      }
      // gRPC retries only a request it kept, by default up to 1 MiB (16 MiB for the channel): a photo is kept whole.
      NettyChannelBuilder channel = NettyChannelBuilder.forTarget(target).maxInboundMessageSize(64 << 20)
          .defaultServiceConfig(serviceConfig()).enableRetry().perRpcBufferLimit(64 << 20)
          .retryBufferSize(256 << 20);
      if (caPem == null) {
        channel.usePlaintext();
      } else {
        SslContextBuilder ssl = GrpcSslContexts.forClient().trustManager(caPem);
        if (certPem != null) {
          ssl.keyManager(certPem, keyPem);
        }
        channel.sslContext(ssl.build());
      }
      return new LookalikeClient(channel.build(), timeout);
    }
  }

  private <T> T call(Function<ImageSimilarityGrpc.ImageSimilarityBlockingStub, T> rpc) {
    return rpc.apply(stub.withDeadlineAfter(timeout.toMillis(), TimeUnit.MILLISECONDS));
  }

  /**
   * Any FindSimilar request (filters, thresholds, groups, diversity) built with the generated builder. Leave
   * exclude_query unset to let the server decide, as every client does: the query's own product is left
   * out of an image id or product id query and kept for a photo or vector.
   */
  public FindSimilarResponse findSimilar(FindSimilarRequest request) {
    return call(s -> s.findSimilar(request));
  }

  /** The k products most like a product (the server's default: the product itself left out). */
  public FindSimilarResponse findSimilarToProduct(String productId, int k) {
    return findSimilar(FindSimilarRequest.newBuilder().setProductId(productId).setK(k).build());
  }

  /** The k products most like an image of the catalogue (the server's default: its product left out). */
  public FindSimilarResponse findSimilarToImageId(String imageId, int k) {
    return findSimilar(FindSimilarRequest.newBuilder().setImageId(imageId).setK(k).build());
  }

  /** The k products most like a photo, encoded bytes: JPEG, PNG, WebP... (the server's default: all kept). */
  public FindSimilarResponse findSimilarToImage(byte[] image, int k) {
    return findSimilar(
        FindSimilarRequest.newBuilder().setImage(ByteString.copyFrom(image)).setK(k).build());
  }

  /** One unit vector per encoded image. */
  public EmbedResponse embed(List<byte[]> images) {
    return embed(images, List.of());
  }

  /**
   * One unit vector per encoded image, of the part of it its region covers (relative to its size, as
   * FindSimilarRequest's region): regions empty for the whole images, else exactly one per image.
   *
   * @throws IllegalArgumentException when there are regions but not one per image
   */
  public EmbedResponse embed(List<byte[]> images, List<Region> regions) {
    if (!regions.isEmpty() && regions.size() != images.size()) {
      throw new IllegalArgumentException(
          regions.size() + " regions for " + images.size() + " images: give one per image");
    }
    EmbedRequest.Builder request = EmbedRequest.newBuilder().addAllRegions(regions);
    images.forEach(image -> request.addImages(ByteString.copyFrom(image)));
    return call(s -> s.embed(request.build()));
  }

  /** k products like the positive products and unlike the negative ones. */
  public RecommendResponse recommend(List<String> positive, List<String> negative, int k) {
    RecommendRequest.Builder request = RecommendRequest.newBuilder().setK(k);
    positive.forEach(id -> request.addPositive(Example.newBuilder().setProductId(id)));
    negative.forEach(id -> request.addNegative(Example.newBuilder().setProductId(id)));
    return recommend(request.build());
  }

  /**
   * Any Recommend request built with the generated builder: a strategy such as sum_scores, image or
   * vector examples, diversity and candidates, filters, groups.
   */
  public RecommendResponse recommend(RecommendRequest request) {
    return call(s -> s.recommend(request));
  }

  /**
   * A Recommend strategy as every lookalike command line and client names it: average_vector, best_score or
   * sum_scores.
   *
   * @throws IllegalArgumentException for any other name
   */
  public static RecommendStrategy parseStrategy(String name) {
    try {
      RecommendStrategy strategy = RecommendStrategy.valueOf("RECOMMEND_STRATEGY_" + name.toUpperCase(Locale.ROOT));
      if (strategy != RecommendStrategy.RECOMMEND_STRATEGY_UNSPECIFIED && strategy != RecommendStrategy.UNRECOGNIZED) {
        return strategy;
      }
    } catch (IllegalArgumentException error) {
      // the message below names the choices
    }
    throw new IllegalArgumentException("strategy " + name + " is not average_vector, best_score or sum_scores");
  }

  /** The served version, its model and index. */
  public GetInfoResponse info() {
    return call(s -> s.getInfo(GetInfoRequest.getDefaultInstance()));
  }

  /** A filter clause: the product's attribute key has one of the values. */
  public static Clause anyOf(String key, String... values) {
    return Clause.newBuilder().setKey(key).addAllAnyOf(Arrays.asList(values)).build();
  }

  /** A filter clause: the product's attribute key has none of the values. */
  public static Clause noneOf(String key, String... values) {
    return Clause.newBuilder().setKey(key).addAllNoneOf(Arrays.asList(values)).build();
  }

  /**
   * A filter clause: the product's number attribute key lies in the range, e.g. inRange("model_year",
   * Range.newBuilder().setGte(2019).build()); a product without the key fails it.
   */
  public static Clause inRange(String key, Range range) {
    return Clause.newBuilder().setKey(key).setRange(range).build();
  }

  private static final Pattern CLAUSE = Pattern.compile("^([A-Za-z_][A-Za-z0-9_]*)(!=|>=|<=|=|>|<)(.*)$");

  /**
   * ALPHA[,RESULTS] (either may be empty for the server's default) or "default", as every lookalike command
   * line takes --query-expansion; set it on a photo or vector FindSimilarRequest. The server bounds them
   * (alpha 0..10, results 1..50).
   *
   * @throws IllegalArgumentException saying what is wrong with the text
   */
  public static QueryExpansion parseQueryExpansion(String text) {
    QueryExpansion.Builder expansion = QueryExpansion.newBuilder();
    if (text.equals("default")) {
      return expansion.build();
    }
    String[] parts = text.split(",", -1);
    try {
      if (parts.length > 2) {
        throw new NumberFormatException();
      }
      if (!parts[0].isEmpty()) {
        expansion.setAlpha(Float.parseFloat(parts[0]));
      }
      if (parts.length == 2 && !parts[1].isEmpty()) {
        expansion.setResults(Integer.parseUnsignedInt(parts[1]));
      }
    } catch (NumberFormatException error) {
      throw new IllegalArgumentException(text + " is not ALPHA[,RESULTS] (e.g. 3 or 3,10) or default");
    }
    return expansion.build();
  }

  /**
   * KEY=V1,V2 (any of), KEY!=V1,V2 (none of), or KEY&lt;X, KEY&lt;=X, KEY&gt;X, KEY&gt;=X (a range over a
   * number attribute), as every lookalike command line takes --filter.
   *
   * @throws IllegalArgumentException saying what is wrong with the text
   */
  public static Clause parseClause(String text) {
    Matcher parts = CLAUSE.matcher(text);
    if (!parts.matches()) {
      throw new IllegalArgumentException(
          text + " is not KEY=V1,V2, KEY!=V1,V2, KEY<X, KEY<=X, KEY>X or KEY>=X");
    }
    String key = parts.group(1);
    String operator = parts.group(2);
    String value = parts.group(3);
    if (operator.equals("=") || operator.equals("!=")) {
      String[] values = Arrays.stream(value.split(",")).filter(v -> !v.isEmpty()).toArray(String[]::new);
      if (values.length == 0) {
        throw new IllegalArgumentException(text + " needs a key and at least one value");
      }
      return operator.equals("=") ? anyOf(key, values) : noneOf(key, values);
    }
    double bound;
    try {
      bound = Double.parseDouble(value);
    } catch (NumberFormatException error) {
      bound = Double.NaN;
    }
    if (Double.isNaN(bound)) {
      throw new IllegalArgumentException(text + ": " + value + " is not a number (KEY" + operator + "X takes one)");
    }
    Range.Builder range = Range.newBuilder();
    switch (operator) {
      case ">": range.setGt(bound); break;
      case ">=": range.setGte(bound); break;
      case "<": range.setLt(bound); break;
      default: range.setLte(bound); break;
    }
    return inRange(key, range.build());
  }

  @Override
  public void close() throws InterruptedException {
    channel.shutdown().awaitTermination(5, TimeUnit.SECONDS);
  }
}
