package com.lookalike.client;

import com.google.protobuf.ByteString;
import com.lookalike.v1.EmbedResponse;
import com.lookalike.v1.Filter;
import com.lookalike.v1.FindSimilarRequest;
import com.lookalike.v1.FindSimilarResponse;
import com.lookalike.v1.Match;
import com.lookalike.v1.QueryExpansion;
import com.lookalike.v1.RecommendRequest;
import com.lookalike.v1.RecommendResponse;
import com.lookalike.v1.RecommendStrategy;
import com.lookalike.v1.Region;
import io.grpc.StatusRuntimeException;
import java.io.File;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Arrays;
import java.util.List;

/**
 * Products like a product, an image id or a photo, as JSON on stdout.
 *
 * <pre>
 * lookalike-example-java --address 127.0.0.1:50051 --product B07XYZ --k 5
 * lookalike-example-java --address 127.0.0.1:50051 --image photo.jpg --filter color=Red,Blue --filter 'model_year>=2019'
 * lookalike-example-java --address 127.0.0.1:50051 --product B07XYZ --diversity 0.3 --candidates 40
 * lookalike-example-java --address 127.0.0.1:50051 --image room.jpg --region 0.1,0.2,0.6,0.9
 * lookalike-example-java --address 127.0.0.1:50051 --image shoe.jpg --query-expansion 3,5
 * lookalike-example-java --address 127.0.0.1:50051 --recommend B07XYZ,B08ABC --negative B01DEF --strategy sum_scores
 * lookalike-example-java --address 127.0.0.1:50051 --embed room.jpg --region 0.1,0.2,0.6,0.9
 * lookalike-example-java --address host:50051 --ca ca.pem --cert client.pem --key client.key --image-id IMG
 * </pre>
 *
 * <p>The query's own product is left out or kept as the server decides (out for --product and
 * --image-id, kept for --image). --recommend prints the recommended products the same way; --embed prints
 * the photo's vector (of its --region) as {"model_version", "vectors"}.
 */
public final class Example {
  private Example() {}

  private static void fail(String message) {
    System.err.println("lookalike-example-java: " + message);
    System.exit(2);
  }

  private static String quoted(String text) {
    StringBuilder out = new StringBuilder("\"");
    for (char c : text.toCharArray()) {
      if (c == '"' || c == '\\') {
        out.append('\\').append(c);
      } else if (c < 0x20) {
        out.append(String.format("\\u%04x", (int) c));
      } else {
        out.append(c);
      }
    }
    return out.append('"').toString();
  }

  private static Region region(String value) {
    String[] parts = value.split(",");
    if (parts.length != 4) {
      fail("--region " + value + " is not X_MIN,Y_MIN,X_MAX,Y_MAX");
    }
    float[] box = new float[4];
    for (int i = 0; i < 4; i++) {
      try {
        box[i] = Float.parseFloat(parts[i]);
      } catch (NumberFormatException error) {
        fail("--region " + value + " is not X_MIN,Y_MIN,X_MAX,Y_MAX");
      }
    }
    return Region.newBuilder().setXMin(box[0]).setYMin(box[1]).setXMax(box[2]).setYMax(box[3]).build();
  }

  /** Product ids, comma-separated, as Recommend examples. */
  private static List<com.lookalike.v1.Example> products(String ids) {
    return Arrays.stream(ids.split(",")).filter(id -> !id.isEmpty())
        .map(id -> com.lookalike.v1.Example.newBuilder().setProductId(id).build()).toList();
  }

  private static String matchesJson(String version, List<Match> matches) {
    StringBuilder out = new StringBuilder("{\"index_version\": ").append(quoted(version));
    out.append(", \"matches\": [");
    for (int i = 0; i < matches.size(); i++) {
      Match match = matches.get(i);
      out.append(i == 0 ? "" : ", ").append("{\"product_id\": ").append(quoted(match.getProductId()))
          .append(", \"image_id\": ").append(quoted(match.getImageId()))
          .append(", \"distance\": ").append(match.getDistance())
          .append(", \"score\": ").append(match.getScore()).append('}');
    }
    return out.append("]}").toString();
  }

  private static String vectorsJson(EmbedResponse response) {
    StringBuilder out = new StringBuilder("{\"model_version\": ").append(quoted(response.getModelVersion()));
    out.append(", \"vectors\": [");
    for (int i = 0; i < response.getVectorsCount(); i++) {
      List<Float> values = response.getVectors(i).getValuesList();
      out.append(i == 0 ? "[" : ", [");
      for (int j = 0; j < values.size(); j++) {
        out.append(j == 0 ? "" : ", ").append(values.get(j));
      }
      out.append(']');
    }
    return out.append("]}").toString();
  }

  private static int number(String flag, String value) {
    try {
      return Integer.parseInt(value);
    } catch (NumberFormatException error) {
      fail(flag + " " + value + " is not a number");
      return 0;
    }
  }

  public static void main(String[] args) throws Exception {
    String address = "127.0.0.1:50051";
    String product = null;
    String imageId = null;
    String image = null;
    String recommend = null;
    String negative = "";
    RecommendStrategy strategy = RecommendStrategy.RECOMMEND_STRATEGY_AVERAGE_VECTOR;
    String embed = null;
    String ca = null;
    String cert = null;
    String key = null;
    int k = 10;
    Float diversity = null;
    int candidates = 0;
    Region region = null;
    QueryExpansion expansion = null;
    Filter.Builder filter = Filter.newBuilder();
    for (int i = 0; i < args.length; i += 2) {
      if (i + 1 >= args.length) {
        fail(args[i] + " needs a value");
      }
      String value = args[i + 1];
      switch (args[i]) {
        case "--address": address = value; break;
        case "--product": product = value; break;
        case "--image-id": imageId = value; break;
        case "--image": image = value; break;
        case "--recommend": recommend = value; break;
        case "--negative": negative = value; break;
        case "--embed": embed = value; break;
        case "--strategy":
          try {
            strategy = LookalikeClient.parseStrategy(value);
          } catch (IllegalArgumentException error) {
            fail("--strategy: " + error.getMessage());
          }
          break;
        case "--ca": ca = value; break;
        case "--cert": cert = value; break;
        case "--key": key = value; break;
        case "--k":
          k = number(args[i], value);
          break;
        case "--candidates":
          candidates = number(args[i], value);
          break;
        case "--filter":
          try {
            filter.addClauses(LookalikeClient.parseClause(value));
          } catch (IllegalArgumentException error) {
            fail("--filter " + error.getMessage());
          }
          break;
        case "--region":
          region = region(value);
          break;
        case "--query-expansion":
          try {
            expansion = LookalikeClient.parseQueryExpansion(value);
          } catch (IllegalArgumentException error) {
            fail("--query-expansion " + error.getMessage());
          }
          break;
        case "--diversity":
          try {
            diversity = Float.parseFloat(value);
          } catch (NumberFormatException error) {
            fail("--diversity " + value + " is not a number");
          }
          break;
        default:
          fail("unknown option " + args[i] + " (--address, --product, --image-id, --image, --recommend, "
              + "--negative, --strategy, --embed, --k, --filter, --diversity, --candidates, --region, "
              + "--query-expansion, --ca, --cert, --key)");
      }
    }
    if ((product == null ? 0 : 1) + (imageId == null ? 0 : 1) + (image == null ? 0 : 1)
        + (recommend == null ? 0 : 1) + (embed == null ? 0 : 1) != 1) {
      fail("give exactly one of --product, --image-id, --image, --recommend, --embed");
    }
    LookalikeClient.Builder builder = LookalikeClient.newBuilder(address).timeout(Duration.ofSeconds(10));
    if (ca != null) {
      builder.tls(new File(ca));
    }
    if (cert != null || key != null) {
      if (cert == null || key == null || ca == null) {
        fail("mTLS needs --cert, --key and --ca");
      }
      builder.clientCertificate(new File(cert), new File(key));
    }
    try (LookalikeClient client = builder.build()) {
      if (embed != null) {
        byte[] photo = Files.readAllBytes(Path.of(embed));
        System.out.println(vectorsJson(client.embed(List.of(photo), region == null ? List.of() : List.of(region))));
        return;
      }
      if (recommend != null) {
        RecommendRequest.Builder request = RecommendRequest.newBuilder().setK(k).setCandidates(candidates)
            .addAllPositive(products(recommend)).addAllNegative(products(negative)).setStrategy(strategy);
        if (filter.getClausesCount() > 0) {
          request.setFilter(filter);
        }
        if (diversity != null) {
          request.setDiversity(diversity);
        }
        RecommendResponse response = client.recommend(request.build());
        System.out.println(matchesJson(response.getIndexVersion(), response.getMatchesList()));
        return;
      }
      FindSimilarRequest.Builder request = FindSimilarRequest.newBuilder().setK(k).setCandidates(candidates);
      if (product != null) {
        request.setProductId(product);
      } else if (imageId != null) {
        request.setImageId(imageId);
      } else {
        request.setImage(ByteString.copyFrom(Files.readAllBytes(Path.of(image))));
      }
      if (region != null) {
        request.setRegion(region);
      }
      if (expansion != null) {
        request.setQueryExpansion(expansion);
      }
      if (filter.getClausesCount() > 0) {
        request.setFilter(filter);
      }
      if (diversity != null) {
        request.setDiversity(diversity);
      }
      FindSimilarResponse response = client.findSimilar(request.build());
      System.out.println(matchesJson(response.getIndexVersion(), response.getMatchesList()));
    } catch (StatusRuntimeException error) {
      fail(error.getStatus().getCode() + ": " + error.getStatus().getDescription());
    } catch (java.io.IOException error) {
      fail(error.getMessage());
    }
  }
}
