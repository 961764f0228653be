// lookalike-example: products like a product, an image id or a photo, as JSON on stdout.
//
//	lookalike-example -address 127.0.0.1:50051 -product B07XYZ -k 5
//	lookalike-example -address 127.0.0.1:50051 -image photo.jpg -filter color=Red,Blue -filter 'item_weight_pounds<2.5'
//	lookalike-example -address 127.0.0.1:50051 -product B07XYZ -diversity 0.3 -candidates 40
//	lookalike-example -address 127.0.0.1:50051 -image room.jpg -region 0.1,0.2,0.6,0.9
//	lookalike-example -address 127.0.0.1:50051 -image shoe.jpg -query-expansion 3,5
//	lookalike-example -address 127.0.0.1:50051 -recommend B07XYZ,B08ABC -negative B01DEF -strategy sum_scores -diversity 0.3
//	lookalike-example -address 127.0.0.1:50051 -embed room.jpg -region 0.1,0.2,0.6,0.9
//	lookalike-example -address host:50051 -ca ca.pem -cert client.pem -key client.key -image-id IMG
//
// The query's own product is left out or kept as the server decides (out for -product and -image-id,
// kept for -image). -recommend prints the recommended products the same way; -embed prints the photo's
// vector (of its -region) as {"model_version", "vectors"}.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io/ioutil"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc/status"

	"lookalike/client"
	pb "lookalike/v1"
)

type match struct {
	ProductID  string            `json:"product_id"`
	ImageID    string            `json:"image_id"`
	Distance   float32           `json:"distance"`
	Score      float32           `json:"score"`
	Attributes map[string]string `json:"attributes,omitempty"`
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "lookalike-example: "+format+"\n", args...)
	os.Exit(2)
}

// retryOrRerun runs this program again with GRPC_GO_RETRY=on when its grpc-go (before 1.40) would
// otherwise ignore the retry policy: grpc-go reads the variable once, at start. An explicit value is kept.
func retryOrRerun() {
	if _, set := os.LookupEnv(client.RetryEnv); set || client.RetriesOn() {
		return
	}
	self, err := os.Executable()
	if err != nil {
		fail("%v", err)
	}
	fail("%v", syscall.Exec(self, os.Args, append(os.Environ(), client.RetryEnv+"=on")))
}

func fromCall(err error) {
	if s, ok := status.FromError(err); ok {
		fail("%s: %s", client.CodeName(err), s.Message())
	}
	fail("%v", err)
}

func printMatches(version string, found []*pb.Match) {
	matches := make([]match, 0, len(found))
	for _, m := range found {
		matches = append(matches, match{m.ProductId, m.ImageId, m.Distance, m.Score, m.Attributes})
	}
	out, _ := json.MarshalIndent(map[string]interface{}{"index_version": version, "matches": matches}, "", "  ")
	fmt.Println(string(out))
}

func productExamples(ids string) []*pb.Example {
	var examples []*pb.Example
	for _, id := range strings.FieldsFunc(ids, func(r rune) bool { return r == ',' }) {
		examples = append(examples, &pb.Example{Example: &pb.Example_ProductId{ProductId: id}})
	}
	return examples
}

func parseRegion(text string) *pb.Region {
	var box [4]float32
	parts := strings.Split(text, ",")
	if len(parts) != 4 {
		fail("-region %q is not X_MIN,Y_MIN,X_MAX,Y_MAX", text)
	}
	for i, part := range parts {
		value, err := strconv.ParseFloat(part, 32)
		if err != nil {
			fail("-region %q is not X_MIN,Y_MIN,X_MAX,Y_MAX", text)
		}
		box[i] = float32(value)
	}
	return &pb.Region{XMin: box[0], YMin: box[1], XMax: box[2], YMax: box[3]}
}

func main() {
	retryOrRerun()
	address := flag.String("address", "127.0.0.1:50051", "server host:port")
	product := flag.String("product", "", "query: a product id")
	imageID := flag.String("image-id", "", "query: an image id")
	image := flag.String("image", "", "query: a photo file")
	recommend := flag.String("recommend", "", "instead of a query: ID,ID, products to recommend more of (Recommend)")
	negative := flag.String("negative", "", "with -recommend: ID,ID, products to recommend less of")
	strategy := flag.String("strategy", "average_vector", "with -recommend: average_vector, best_score or sum_scores")
	embed := flag.String("embed", "", "instead of a query: a photo file to embed (of its -region), printing its vector")
	k := flag.Uint("k", 10, "products to return")
	var clauses []*pb.Clause
	flag.Func("filter", "KEY=V1,V2 (any of), KEY!=V1,V2 (none of), or KEY<X, KEY<=X, KEY>X, KEY>=X (a number in "+
		"range); repeat to AND clauses", func(text string) error {
		clause, err := client.ParseClause(text)
		clauses = append(clauses, clause)
		return err
	})
	caFile := flag.String("ca", "", "CA certificate (PEM) for TLS")
	certFile := flag.String("cert", "", "client certificate (PEM) for mTLS, with -key")
	keyFile := flag.String("key", "", "client key (PEM) for mTLS, with -cert")
	timeout := flag.Duration("timeout", 10*time.Second, "deadline of the call, retries included")
	diversity := flag.Float64("diversity", 0, "0..1: results unlike each other (MMR); unset or 0: the plain ranking")
	candidates := flag.Uint("candidates", 0, "with -diversity: products to choose among (0: the server's default)")
	region := flag.String("region", "", "with -image: X_MIN,Y_MIN,X_MAX,Y_MAX, the part of the photo to search with")
	var expansion *pb.QueryExpansion
	flag.Func("query-expansion", "with -image: ALPHA[,RESULTS] or default, search again with the photo averaged "+
		"with its RESULTS most similar products weighted by score^ALPHA", func(text string) (err error) {
		expansion, err = client.ParseQueryExpansion(text)
		return err
	})
	flag.Parse()
	query := client.Query{ProductID: *product, ImageID: *imageID, Candidates: uint32(*candidates),
		QueryExpansion: expansion}
	flag.Visit(func(f *flag.Flag) {
		if f.Name == "diversity" {
			value := float32(*diversity)
			query.Diversity = &value
		}
	})
	if *image != "" {
		data, err := ioutil.ReadFile(*image)
		if err != nil {
			fail("%v", err)
		}
		query.Image = data
	}
	if *region != "" {
		query.Region = parseRegion(*region)
	}
	var filter *pb.Filter
	if len(clauses) > 0 {
		filter = &pb.Filter{Clauses: clauses}
	}
	lookalike, err := client.Dial(*address, client.Options{Timeout: *timeout, CAFile: *caFile, CertFile: *certFile,
		KeyFile: *keyFile})
	if err != nil {
		fail("%v", err)
	}
	defer lookalike.Close()
	switch {
	case *embed != "":
		data, err := ioutil.ReadFile(*embed)
		if err != nil {
			fail("%v", err)
		}
		var regions []*pb.Region
		if query.Region != nil {
			regions = []*pb.Region{query.Region}
		}
		response, err := lookalike.EmbedRegions(context.Background(), [][]byte{data}, regions)
		if err != nil {
			fromCall(err)
		}
		vectors := make([][]float32, 0, len(response.Vectors))
		for _, vector := range response.Vectors {
			vectors = append(vectors, vector.Values)
		}
		out, _ := json.Marshal(map[string]interface{}{"model_version": response.ModelVersion, "vectors": vectors})
		fmt.Println(string(out))
	case *recommend != "":
		chosen, err := client.ParseStrategy(*strategy)
		if err != nil {
			fail("-strategy: %v", err)
		}
		request := &pb.RecommendRequest{Positive: productExamples(*recommend), Negative: productExamples(*negative),
			Strategy: chosen, K: uint32(*k), Filter: filter, Diversity: query.Diversity, Candidates: query.Candidates}
		response, err := lookalike.RecommendWith(context.Background(), request)
		if err != nil {
			fromCall(err)
		}
		printMatches(response.IndexVersion, response.Matches)
	default:
		response, err := lookalike.FindSimilar(context.Background(), query, uint32(*k), filter)
		if err != nil {
			fromCall(err)
		}
		printMatches(response.IndexVersion, response.Matches)
	}
}
