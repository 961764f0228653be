package com.lookalike.client;

import com.google.protobuf.ByteString;
import com.lookalike.v1.EmbedRequest;
import com.lookalike.v1.EmbedResponse;
import com.lookalike.v1.Example;
import com.lookalike.v1.FindSimilarRequest;
import com.lookalike.v1.FindSimilarResponse;
import com.lookalike.v1.GetInfoRequest;
import com.lookalike.v1.GetInfoResponse;
import com.lookalike.v1.ImageSimilarityGrpc;
import com.lookalike.v1.RecommendRequest;
import com.lookalike.v1.RecommendResponse;
import io.grpc.ManagedChannel;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.netty.GrpcSslContexts;
import io.grpc.netty.NettyChannelBuilder;
import java.io.File;
import java.time.Duration;
import java.util.List;
import java.util.concurrent.TimeUnit;
import java.util.function.Function;
import javax.net.ssl.SSLException;

/**
 * A small wrapper over the generated lookalike.v1 stubs: every call has a deadline, UNAVAILABLE (a
 * restarting or draining server) is retried with exponential backoff, and TLS is one builder option.
 */
public final class LookalikeClient implements AutoCloseable {
  private final ManagedChannel channel;
  private final ImageSimilarityGrpc.ImageSimilarityBlockingStub stub;
  private final Duration timeout;
  private final int attempts;

  private LookalikeClient(ManagedChannel channel, Duration timeout, int attempts) {
    this.channel = channel;
    this.stub = ImageSimilarityGrpc.newBlockingStub(channel);
    this.timeout = timeout;
    this.attempts = attempts;
  }

  public static Builder newBuilder(String target) {
    return new Builder(target);
  }

  /** How to reach the server and how patient to be. */
  public static final class Builder {
    private final String target;
    private Duration timeout = Duration.ofSeconds(10);
    private int attempts = 3;
    private File caPem;

    private Builder(String target) {
      this.target = target;
    }

    /** Deadline of each attempt (10 s by default). */
    public Builder timeout(Duration timeout) {
      this.timeout = timeout;
      return this;
    }

    /** Attempts on UNAVAILABLE (3 by default; 1 means no retry). */
    public Builder attempts(int attempts) {
      if (attempts < 1) {
        throw new IllegalArgumentException("attempts must be at least 1");
      }
      this.attempts = attempts;
      return this;
    }

    /** TLS, trusting the CA certificate in this PEM file. */
    public Builder tls(File caPem) {
      this.caPem = caPem;
      return this;
    }

    public LookalikeClient build() throws SSLException {
      NettyChannelBuilder channel =
          NettyChannelBuilder.forTarget(target).maxInboundMessageSize(64 << 20);
      if (caPem == null) {
        channel.usePlaintext();
      } else {
        channel.sslContext(GrpcSslContexts.forClient().trustManager(caPem).build());
      }
      return new LookalikeClient(channel.build(), timeout, attempts);
    }
  }

  private <T> T call(Function<ImageSimilarityGrpc.ImageSimilarityBlockingStub, T> rpc) {
    long backoffMillis = 50;
    for (int attempt = 1; ; attempt++) {
      try {
        return rpc.apply(stub.withDeadlineAfter(timeout.toMillis(), TimeUnit.MILLISECONDS));
      } catch (StatusRuntimeException error) {
        if (error.getStatus().getCode() != Status.Code.UNAVAILABLE || attempt >= attempts) {
          throw error;
        }
      }
      try {
        Thread.sleep(backoffMillis);
      } catch (InterruptedException interrupted) {
        Thread.currentThread().interrupt();
        throw Status.CANCELLED.withDescription("interrupted").asRuntimeException();
      }
      backoffMillis *= 2;
    }
  }

  /** Any FindSimilar request (filters, thresholds, groups) built with the generated builder. */
  public FindSimilarResponse findSimilar(FindSimilarRequest request) {
    return call(s -> s.findSimilar(request));
  }

  /** The k products most like a product (the product itself left out). */
  public FindSimilarResponse findSimilarToProduct(String productId, int k) {
    return findSimilar(
        FindSimilarRequest.newBuilder().setProductId(productId).setK(k).setExcludeQuery(true).build());
  }

  /** The k products most like an image of the catalogue (its product left out). */
  public FindSimilarResponse findSimilarToImageId(String imageId, int k) {
    return findSimilar(
        FindSimilarRequest.newBuilder().setImageId(imageId).setK(k).setExcludeQuery(true).build());
  }

  /** The k products most like a photo (encoded bytes: JPEG, PNG, WebP...). */
  public FindSimilarResponse findSimilarToImage(byte[] image, int k) {
    return findSimilar(
        FindSimilarRequest.newBuilder().setImage(ByteString.copyFrom(image)).setK(k).build());
  }

  /** One unit vector per encoded image. */
  public EmbedResponse embed(List<byte[]> images) {
    EmbedRequest.Builder request = EmbedRequest.newBuilder();
    images.forEach(image -> request.addImages(ByteString.copyFrom(image)));
    return call(s -> s.embed(request.build()));
  }

  /** k products like the positive products and unlike the negative ones. */
  public RecommendResponse recommend(List<String> positive, List<String> negative, int k) {
    RecommendRequest.Builder request = RecommendRequest.newBuilder().setK(k);
    positive.forEach(id -> request.addPositive(Example.newBuilder().setProductId(id)));
    negative.forEach(id -> request.addNegative(Example.newBuilder().setProductId(id)));
    return call(s -> s.recommend(request.build()));
  }

  /** The served version, its model and index. */
  public GetInfoResponse info() {
    return call(s -> s.getInfo(GetInfoRequest.getDefaultInstance()));
  }

  @Override
  public void close() throws InterruptedException {
    channel.shutdown().awaitTermination(5, TimeUnit.SECONDS);
  }
}
