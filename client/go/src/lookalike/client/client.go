// Package client is a small idiomatic wrapper over the generated lookalike.v1 stubs: every call has
// one deadline, UNAVAILABLE and CANCELLED are retried by gRPC itself under the service config every
// lookalike client loads (protos/lookalike/v1/service_config.json), and TLS is one option.
package client

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/ioutil"
	"math"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"lookalike/serviceconfig"
	pb "lookalike/v1"
)

// Options say how to reach the server and how patient to be.
type Options struct {
	// Deadline of each call, its retries included; 10 s when zero. A context's earlier deadline wins.
	Timeout time.Duration
	// PEM file of the CA that signed the server's certificate; empty means plaintext.
	CAFile string
	// PEM files of this client's certificate and key, for a server that requires mTLS.
	CertFile, KeyFile string
}

// RetryEnv is the environment variable that turns gRPC's retries on in grpc-go before 1.40 (Debian
// bookworm ships 1.33); grpc-go reads it once, when the process starts.
const RetryEnv = "GRPC_GO_RETRY"

// RetriesOn says whether grpc-go applies the service config's retry policy in this process: always from
// grpc-go 1.40, before that only when the process started with GRPC_GO_RETRY=on.
func RetriesOn() bool {
	parts := strings.SplitN(grpc.Version, ".", 3)
	if len(parts) >= 2 {
		major, errMajor := strconv.Atoi(parts[0])
		minor, errMinor := strconv.Atoi(parts[1])
		if errMajor == nil && errMinor == nil && (major > 1 || minor >= 40) {
			return true
		}
	}
	return strings.EqualFold(os.Getenv(RetryEnv), "on")
}

// Client calls one lookalike server.
type Client struct {
	conn    *grpc.ClientConn
	stub    pb.ImageSimilarityClient
	options Options
}

// Dial connects to address (host:port). The connection is made lazily; the first call waits for it.
func Dial(address string, options Options) (*Client, error) {
	if options.Timeout <= 0 {
		options.Timeout = 10 * time.Second
	}
	// gRPC retries only a request it kept, by default up to 256 KiB: a photo is kept whole.
	dialOptions := []grpc.DialOption{grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20),
		grpc.MaxCallSendMsgSize(64<<20), grpc.MaxRetryRPCBufferSize(64<<20)),
		grpc.WithDefaultServiceConfig(serviceconfig.JSON)}
	if options.CAFile == "" {
		dialOptions = append(dialOptions, grpc.WithInsecure())
	} else {
		config, err := tlsConfig(options)
		if err != nil {
			return nil, err
		}
		dialOptions = append(dialOptions, grpc.WithTransportCredentials(credentials.NewTLS(config)))
	}
	conn, err := grpc.Dial(address, dialOptions...)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, stub: pb.NewImageSimilarityClient(conn), options: options}, nil
}

func tlsConfig(options Options) (*tls.Config, error) {
	pem, err := ioutil.ReadFile(options.CAFile)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", options.CAFile)
	}
	config := &tls.Config{RootCAs: roots}
	if options.CertFile != "" {
		pair, err := tls.LoadX509KeyPair(options.CertFile, options.KeyFile)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return config, nil
}

// Close releases the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Stub is the generated client, for calls the wrapper does not cover.
func (c *Client) Stub() pb.ImageSimilarityClient { return c.stub }

// deadline bounds one call, its retries included.
func (c *Client) deadline(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, c.options.Timeout)
}

// Query says what FindSimilar searches with; set exactly one of ProductID, ImageID, Image, Vector.
type Query struct {
	ProductID string
	ImageID   string
	Image     []byte
	Vector    []float32
	// Whether the query's own product is left out; nil lets the server decide, as for every client:
	// left out of a ProductID or ImageID query, kept for an Image or Vector.
	ExcludeQuery *bool
	// Diversity in 0..1: maximal marginal relevance chooses the k among the Candidates most relevant
	// products; nil or 0 is the plain ranking. Candidates 0 is the server's default, 4 x k within its bounds.
	Diversity  *float32
	Candidates uint32
	// With an Image: the part of it to search with, relative to its size (nil: the whole image).
	Region *pb.Region
	// With an Image or Vector: search again with the query averaged with its first results (alpha-query
	// expansion); nil searches with the query alone. ParseQueryExpansion reads the command lines' form.
	QueryExpansion *pb.QueryExpansion
}

func (q Query) apply(request *pb.FindSimilarRequest) error {
	set := 0
	if q.ProductID != "" {
		request.Query, set = &pb.FindSimilarRequest_ProductId{ProductId: q.ProductID}, set+1
	}
	if q.ImageID != "" {
		request.Query, set = &pb.FindSimilarRequest_ImageId{ImageId: q.ImageID}, set+1
	}
	if q.Image != nil {
		request.Query, set = &pb.FindSimilarRequest_Image{Image: q.Image}, set+1
	}
	if q.Vector != nil {
		request.Query, set = &pb.FindSimilarRequest_Vector{Vector: &pb.Vector{Values: q.Vector}}, set+1
	}
	if set != 1 {
		return errors.New("a query has exactly one of ProductID, ImageID, Image, Vector")
	}
	return nil
}

// FindSimilar returns the k products most like the query (the query's own product left out or kept as
// Query.ExcludeQuery says).
func (c *Client) FindSimilar(ctx context.Context, query Query, k uint32, filter *pb.Filter) (*pb.FindSimilarResponse, error) {
	request := &pb.FindSimilarRequest{K: k, ExcludeQuery: query.ExcludeQuery, Filter: filter,
		Diversity: query.Diversity, Candidates: query.Candidates, Region: query.Region,
		QueryExpansion: query.QueryExpansion}
	if err := query.apply(request); err != nil {
		return nil, err
	}
	ctx, cancel := c.deadline(ctx)
	defer cancel()
	return c.stub.FindSimilar(ctx, request)
}

// Embed returns one unit vector per encoded image.
func (c *Client) Embed(ctx context.Context, images ...[]byte) (*pb.EmbedResponse, error) {
	return c.EmbedRegions(ctx, images, nil)
}

// EmbedRegions returns one unit vector per encoded image, of the part of it its region covers (relative to
// its size, as Query.Region): regions is nil for the whole images, else holds exactly one per image.
func (c *Client) EmbedRegions(ctx context.Context, images [][]byte, regions []*pb.Region) (*pb.EmbedResponse, error) {
	if len(regions) != 0 && len(regions) != len(images) {
		return nil, fmt.Errorf("%d regions for %d images: give one per image", len(regions), len(images))
	}
	ctx, cancel := c.deadline(ctx)
	defer cancel()
	return c.stub.Embed(ctx, &pb.EmbedRequest{Images: images, Regions: regions})
}

// Recommend returns k products like the positive products and unlike the negative ones.
func (c *Client) Recommend(ctx context.Context, positive, negative []string, k uint32, filter *pb.Filter) (*pb.RecommendResponse, error) {
	examples := func(ids []string) []*pb.Example {
		out := make([]*pb.Example, len(ids))
		for i, id := range ids {
			out[i] = &pb.Example{Example: &pb.Example_ProductId{ProductId: id}}
		}
		return out
	}
	request := &pb.RecommendRequest{Positive: examples(positive), Negative: examples(negative), K: k, Filter: filter}
	return c.RecommendWith(ctx, request)
}

// ParseStrategy reads a Recommend strategy as every lookalike command line and client names it:
// average_vector, best_score or sum_scores.
func ParseStrategy(name string) (pb.RecommendStrategy, error) {
	value, ok := pb.RecommendStrategy_value["RECOMMEND_STRATEGY_"+strings.ToUpper(name)]
	if !ok || value == int32(pb.RecommendStrategy_RECOMMEND_STRATEGY_UNSPECIFIED) {
		return 0, fmt.Errorf("strategy %q is not average_vector, best_score or sum_scores", name)
	}
	return pb.RecommendStrategy(value), nil
}

// RecommendWith sends any RecommendRequest (a strategy such as sum_scores, image or vector examples,
// diversity, groups), under the call's one deadline.
func (c *Client) RecommendWith(ctx context.Context, request *pb.RecommendRequest) (*pb.RecommendResponse, error) {
	ctx, cancel := c.deadline(ctx)
	defer cancel()
	return c.stub.Recommend(ctx, request)
}

// Info describes the served version.
func (c *Client) Info(ctx context.Context) (*pb.GetInfoResponse, error) {
	ctx, cancel := c.deadline(ctx)
	defer cancel()
	return c.stub.GetInfo(ctx, &pb.GetInfoRequest{})
}

// CodeName is an error's gRPC status code as the gRPC specification and the other clients spell it
// (INVALID_ARGUMENT, NOT_FOUND, ...); "OK" for no error.
func CodeName(err error) string {
	if err == nil {
		return "OK"
	}
	camel := status.Code(err).String()
	var name []rune
	for i, r := range camel {
		if i > 0 && unicode.IsUpper(r) {
			name = append(name, '_')
		}
		name = append(name, unicode.ToUpper(r))
	}
	return string(name)
}

// AnyOf is a filter clause: the product's attribute key has one of the values.
func AnyOf(key string, values ...string) *pb.Clause { return &pb.Clause{Key: key, AnyOf: values} }

// NoneOf is a filter clause: the product's attribute key has none of the values.
func NoneOf(key string, values ...string) *pb.Clause { return &pb.Clause{Key: key, NoneOf: values} }

// InRange is a filter clause: the product's number attribute key lies in the range, e.g.
// InRange("model_year", &pb.Range{Gte: Bound(2019)}); a product without the key fails it.
func InRange(key string, bounds *pb.Range) *pb.Clause { return &pb.Clause{Key: key, Range: bounds} }

// Bound is a range bound: pb.Range's fields are optional, so they take pointers.
func Bound(value float64) *float64 { return &value }

// clauseForm is a clause as a command line writes it: an identifier, an operator, the value(s).
var clauseForm = regexp.MustCompile(`^([A-Za-z_][A-Za-z0-9_]*)(!=|>=|<=|=|>|<)(.*)$`)

// ParseClause reads KEY=V1,V2 (any of), KEY!=V1,V2 (none of), or KEY<X, KEY<=X, KEY>X, KEY>=X (a range over a
// number attribute), as every lookalike command line takes --filter.
func ParseClause(text string) (*pb.Clause, error) {
	parts := clauseForm.FindStringSubmatch(text)
	if parts == nil {
		return nil, fmt.Errorf("%q is not KEY=V1,V2, KEY!=V1,V2, KEY<X, KEY<=X, KEY>X or KEY>=X", text)
	}
	key, operator, value := parts[1], parts[2], parts[3]
	if operator == "=" || operator == "!=" {
		values := strings.FieldsFunc(value, func(r rune) bool { return r == ',' })
		if len(values) == 0 {
			return nil, fmt.Errorf("%q needs a key and at least one value", text)
		}
		if operator == "!=" {
			return NoneOf(key, values...), nil
		}
		return AnyOf(key, values...), nil
	}
	bound, err := strconv.ParseFloat(value, 64)
	if err != nil || math.IsNaN(bound) {
		return nil, fmt.Errorf("%q: %q is not a number (KEY%sX takes one)", text, value, operator)
	}
	bounds := map[string]*pb.Range{">": {Gt: Bound(bound)}, ">=": {Gte: Bound(bound)}, "<": {Lt: Bound(bound)},
		"<=": {Lte: Bound(bound)}}
	return InRange(key, bounds[operator]), nil
}

// ParseQueryExpansion reads ALPHA[,RESULTS] (either may be empty for the server's default) or "default", as every
// lookalike command line takes --query-expansion. The server bounds them (alpha 0..10, results 1..50).
func ParseQueryExpansion(text string) (*pb.QueryExpansion, error) {
	expansion := &pb.QueryExpansion{}
	if text == "default" {
		return expansion, nil
	}
	parts := strings.Split(text, ",")
	wrong := fmt.Errorf("%q is not ALPHA[,RESULTS] (e.g. 3 or 3,10) or default", text)
	if len(parts) > 2 {
		return nil, wrong
	}
	if parts[0] != "" {
		alpha, err := strconv.ParseFloat(parts[0], 32)
		if err != nil {
			return nil, wrong
		}
		value := float32(alpha)
		expansion.Alpha = &value
	}
	if len(parts) == 2 && parts[1] != "" {
		results, err := strconv.ParseUint(parts[1], 10, 32)
		if err != nil {
			return nil, wrong
		}
		expansion.Results = uint32(results)
	}
	return expansion, nil
}
