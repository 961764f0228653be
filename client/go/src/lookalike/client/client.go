// Package client is a small idiomatic wrapper over the generated lookalike.v1 stubs: every call has
// a deadline, UNAVAILABLE is retried with backoff, and TLS is one option.
package client

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/ioutil"
	"time"
	"unicode"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	pb "lookalike/v1"
)

// Options say how to reach the server and how patient to be.
type Options struct {
	// Deadline of each attempt; 10 s when zero.
	Timeout time.Duration
	// Attempts on UNAVAILABLE (a restarting or draining server); 3 when zero, 1 means no retry.
	Attempts int
	// PEM file of the CA that signed the server's certificate; empty means plaintext.
	CAFile string
	// PEM files of this client's certificate and key, for a server that requires mTLS.
	CertFile, KeyFile string
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
	if options.Attempts <= 0 {
		options.Attempts = 3
	}
	dialOptions := []grpc.DialOption{grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20),
		grpc.MaxCallSendMsgSize(64<<20))}
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

// call runs one RPC with a deadline per attempt, retrying UNAVAILABLE with exponential backoff.
func (c *Client) call(ctx context.Context, rpc func(context.Context) error) error {
	backoff := 50 * time.Millisecond
	var err error
	for attempt := 1; attempt <= c.options.Attempts; attempt++ {
		attemptCtx, cancel := context.WithTimeout(ctx, c.options.Timeout)
		err = rpc(attemptCtx)
		cancel()
		if status.Code(err) != codes.Unavailable || attempt == c.options.Attempts {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(backoff):
		}
		backoff *= 2
	}
	return err
}

// Query says what FindSimilar searches with; set exactly one of the fields.
type Query struct {
	ProductID string
	ImageID   string
	Image     []byte
	Vector    []float32
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

// FindSimilar returns the k products most like the query. A product or image id query leaves out the
// query's own product; a photo or vector query has none and keeps every product.
func (c *Client) FindSimilar(ctx context.Context, query Query, k uint32, filter *pb.Filter) (*pb.FindSimilarResponse, error) {
	byID := query.ProductID != "" || query.ImageID != ""
	request := &pb.FindSimilarRequest{K: k, ExcludeQuery: byID, Filter: filter}
	if err := query.apply(request); err != nil {
		return nil, err
	}
	var response *pb.FindSimilarResponse
	err := c.call(ctx, func(ctx context.Context) (err error) {
		response, err = c.stub.FindSimilar(ctx, request)
		return err
	})
	return response, err
}

// Embed returns one unit vector per encoded image.
func (c *Client) Embed(ctx context.Context, images ...[]byte) (*pb.EmbedResponse, error) {
	var response *pb.EmbedResponse
	err := c.call(ctx, func(ctx context.Context) (err error) {
		response, err = c.stub.Embed(ctx, &pb.EmbedRequest{Images: images})
		return err
	})
	return response, err
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
	var response *pb.RecommendResponse
	err := c.call(ctx, func(ctx context.Context) (err error) {
		response, err = c.stub.Recommend(ctx, request)
		return err
	})
	return response, err
}

// Info describes the served version.
func (c *Client) Info(ctx context.Context) (*pb.GetInfoResponse, error) {
	var response *pb.GetInfoResponse
	err := c.call(ctx, func(ctx context.Context) (err error) {
		response, err = c.stub.GetInfo(ctx, &pb.GetInfoRequest{})
		return err
	})
	return response, err
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
