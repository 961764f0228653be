// lookalike-loadgen: closed- and open-loop load on one lookalike address, compiled so that the load
// generator is not the bottleneck. The modes and the JSON report are those of `lookalike bench`.
// Every run ends by itself: a duration (at most 10 minutes) or a request count, whichever comes first;
// SIGTERM or SIGINT ends it sooner, its calls in flight finished and its report written as ever.
package main

import (
	"bufio"
	"compress/gzip"
	"context"
	"encoding/csv"
	"encoding/json"
	"flag"
	"fmt"
	"io/ioutil"
	"math"
	"math/rand"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"

	"lookalike/client"
	pb "lookalike/v1"
)

const (
	maxDuration    = 10 * time.Minute
	maxOutstanding = 5000 // open loop: arrivals beyond this many unfinished calls are counted, not sent
	queryLimit     = 256
)

var operations = []string{"embed", "image", "id", "product", "recommend", "info"}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "lookalike-loadgen: "+format+"\n", args...)
	os.Exit(2)
}

type queries struct {
	images   [][]byte
	imageIDs []string
	products []string
}

func openGzip(path string) (*gzip.Reader, *os.File, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	reader, err := gzip.NewReader(file)
	if err != nil {
		file.Close()
		return nil, nil, err
	}
	return reader, file, nil
}

// loadQueries reads image ids, image bytes and product ids from a catalogue in the ABO layout.
func loadQueries(catalogue string, rng *rand.Rand) (queries, error) {
	var q queries
	reader, file, err := openGzip(filepath.Join(catalogue, "images.csv.gz"))
	if err != nil {
		return q, err
	}
	rows, err := csv.NewReader(reader).ReadAll()
	file.Close()
	if err != nil || len(rows) < 2 {
		return q, fmt.Errorf("%s/images.csv.gz has no rows", catalogue)
	}
	header := map[string]int{}
	for i, name := range rows[0] {
		header[name] = i
	}
	rows = rows[1:]
	rng.Shuffle(len(rows), func(i, j int) { rows[i], rows[j] = rows[j], rows[i] })
	for _, row := range rows {
		data, err := ioutil.ReadFile(filepath.Join(catalogue, "small", row[header["path"]]))
		if err != nil {
			continue
		}
		q.images = append(q.images, data)
		q.imageIDs = append(q.imageIDs, row[header["image_id"]])
		if len(q.images) >= queryLimit {
			break
		}
	}
	parts, _ := filepath.Glob(filepath.Join(catalogue, "listings", "metadata", "listings_*.json.gz"))
	sort.Strings(parts)
	for _, part := range parts {
		reader, file, err := openGzip(part)
		if err != nil {
			return q, err
		}
		scanner := bufio.NewScanner(reader)
		scanner.Buffer(make([]byte, 1<<20), 16<<20)
		for scanner.Scan() {
			var listing struct {
				ItemID string `json:"item_id"`
			}
			if json.Unmarshal(scanner.Bytes(), &listing) == nil && listing.ItemID != "" {
				q.products = append(q.products, listing.ItemID)
			}
		}
		file.Close()
	}
	rng.Shuffle(len(q.products), func(i, j int) { q.products[i], q.products[j] = q.products[j], q.products[i] })
	if len(q.products) > queryLimit {
		q.products = q.products[:queryLimit]
	}
	return q, nil
}

func parseMix(text string) (map[string]float64, error) {
	mix := map[string]float64{}
	for _, part := range strings.Split(text, ",") {
		name, weight := part, "1"
		if i := strings.Index(part, "="); i >= 0 {
			name, weight = part[:i], part[i+1:]
		}
		value, err := strconv.ParseFloat(weight, 64)
		known := false
		for _, op := range operations {
			known = known || op == name
		}
		if err != nil || value < 0 || !known {
			return nil, fmt.Errorf("-mix part %q is not OPERATION=WEIGHT with OPERATION one of %v", part, operations)
		}
		mix[name] = value
	}
	return mix, nil
}

type recorder struct {
	mu            sync.Mutex
	latencies     map[string][]float64
	latencyByCode map[string][]float64
	codes         map[string]int
	codesByOp     map[string]map[string]int
	skipped       int
}

func newRecorder() *recorder {
	return &recorder{latencies: map[string][]float64{}, latencyByCode: map[string][]float64{},
		codes: map[string]int{}, codesByOp: map[string]map[string]int{}}
}

func (r *recorder) add(op string, seconds float64, code string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.codes[code]++
	if r.codesByOp[op] == nil {
		r.codesByOp[op] = map[string]int{}
	}
	r.codesByOp[op][code]++
	r.latencyByCode[code] = append(r.latencyByCode[code], seconds)
	if code == "OK" {
		r.latencies[op] = append(r.latencies[op], seconds)
		r.latencies["all"] = append(r.latencies["all"], seconds)
	}
}

func percentiles(values []float64) map[string]interface{} {
	if len(values) == 0 {
		return map[string]interface{}{"p50_ms": nil, "p90_ms": nil, "p99_ms": nil, "max_ms": nil}
	}
	sorted := append([]float64(nil), values...)
	sort.Float64s(sorted)
	at := func(p float64) float64 { // linear interpolation, as numpy's percentile
		position := p / 100 * float64(len(sorted)-1)
		low := int(math.Floor(position))
		high := int(math.Ceil(position))
		value := sorted[low] + (sorted[high]-sorted[low])*(position-float64(low))
		return math.Round(value*1e6) / 1e3
	}
	return map[string]interface{}{"p50_ms": at(50), "p90_ms": at(90), "p99_ms": at(99), "max_ms": at(100)}
}

type caller struct {
	stubs   []pb.ImageSimilarityClient
	next    uint64
	q       queries
	k       uint32
	timeout time.Duration
	ops     []string
	cumul   []float64
}

func (c *caller) pick(rng *rand.Rand) string {
	x := rng.Float64() * c.cumul[len(c.cumul)-1]
	for i, bound := range c.cumul {
		if x < bound {
			return c.ops[i]
		}
	}
	return c.ops[len(c.ops)-1]
}

// one makes one call of operation op and returns its status code name.
func (c *caller) one(op string, rng *rand.Rand) string {
	stub := c.stubs[atomic.AddUint64(&c.next, 1)%uint64(len(c.stubs))]
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	var err error
	switch op {
	case "info":
		_, err = stub.GetInfo(ctx, &pb.GetInfoRequest{})
	case "id":
		id := c.q.imageIDs[rng.Intn(len(c.q.imageIDs))]
		_, err = stub.FindSimilar(ctx, &pb.FindSimilarRequest{Query: &pb.FindSimilarRequest_ImageId{ImageId: id}, K: c.k})
	case "product":
		id := c.q.products[rng.Intn(len(c.q.products))]
		_, err = stub.FindSimilar(ctx, &pb.FindSimilarRequest{Query: &pb.FindSimilarRequest_ProductId{ProductId: id}, K: c.k})
	case "image":
		image := c.q.images[rng.Intn(len(c.q.images))]
		_, err = stub.FindSimilar(ctx, &pb.FindSimilarRequest{Query: &pb.FindSimilarRequest_Image{Image: image}, K: c.k})
	case "embed":
		_, err = stub.Embed(ctx, &pb.EmbedRequest{Images: [][]byte{c.q.images[rng.Intn(len(c.q.images))]}})
	case "recommend":
		var positive []*pb.Example
		for i := 0; i < 3 && i < len(c.q.products); i++ {
			id := c.q.products[rng.Intn(len(c.q.products))]
			positive = append(positive, &pb.Example{Example: &pb.Example_ProductId{ProductId: id}})
		}
		_, err = stub.Recommend(ctx, &pb.RecommendRequest{Positive: positive, K: c.k})
	}
	return client.CodeName(err)
}

func main() {
	// Asked to stop (a benchmark's background load ends with its measurement): no new calls, the report as ever.
	var stopped int32
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		atomic.StoreInt32(&stopped, 1)
		<-stop // a second one ends it at once, as an interrupt did before
		os.Exit(130)
	}()
	address := flag.String("address", "127.0.0.1:50051", "the one address this load goes to")
	catalogue := flag.String("catalogue", "", "catalogue root (ABO layout) to draw queries from")
	mode := flag.String("mode", "closed", "closed: -concurrency callers back to back; open: Poisson arrivals at -rate")
	concurrency := flag.Int("concurrency", 8, "closed loop: concurrent callers")
	rate := flag.Float64("rate", 50, "open loop: mean arrivals per second")
	duration := flag.Duration("duration", 10*time.Second, "run at most this long (at most 10m)")
	requests := flag.Int64("requests", 0, "or stop after this many requests (0: no count limit)")
	mixText := flag.String("mix", "info=1", "OPERATION=WEIGHT,... of "+strings.Join(operations, ", "))
	connections := flag.Int("connections", 4, "HTTP/2 connections, used in turn (a --workers server spreads them)")
	k := flag.Uint("k", 10, "products per FindSimilar/Recommend")
	timeout := flag.Duration("timeout", 10*time.Second, "deadline of each call")
	seed := flag.Int64("seed", 0, "random seed for queries and arrivals")
	asJSON := flag.Bool("json", false, "the report as JSON on stdout")
	flag.Parse()
	if *mode != "closed" && *mode != "open" {
		fail("-mode is closed or open, not %q", *mode)
	}
	if *duration <= 0 || *duration > maxDuration {
		fail("-duration must be in (0, %s]: a load run always ends by itself", maxDuration)
	}
	if *concurrency < 1 || *connections < 1 || *rate <= 0 || *requests < 0 {
		fail("-concurrency, -connections and -rate must be positive, -requests not negative")
	}
	mix, err := parseMix(*mixText)
	if err != nil {
		fail("%v", err)
	}
	rng := rand.New(rand.NewSource(*seed))
	q := queries{}
	needs := mix["id"]+mix["image"]+mix["embed"]+mix["product"]+mix["recommend"] > 0
	if needs {
		if *catalogue == "" {
			fail("-catalogue is needed for operations other than info")
		}
		if q, err = loadQueries(*catalogue, rng); err != nil {
			fail("%v", err)
		}
		if len(q.images) == 0 && mix["id"]+mix["image"]+mix["embed"] > 0 {
			fail("no images under %s/small", *catalogue)
		}
		if len(q.products) == 0 && mix["product"]+mix["recommend"] > 0 {
			fail("%s has no listings to draw product ids from", *catalogue)
		}
	}
	c := &caller{q: q, k: uint32(*k), timeout: *timeout}
	total := 0.0
	for _, op := range operations {
		if weight := mix[op]; weight > 0 {
			total += weight
			c.ops, c.cumul = append(c.ops, op), append(c.cumul, total)
		}
	}
	if total <= 0 {
		fail("the mix needs a positive weight")
	}
	for i := 0; i < *connections; i++ {
		conn, err := grpc.Dial(*address, grpc.WithInsecure(), grpc.WithBlock(), grpc.WithTimeout(10*time.Second),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
		if err != nil {
			fail("cannot connect to %s: %v", *address, err)
		}
		defer conn.Close()
		c.stubs = append(c.stubs, pb.NewImageSimilarityClient(conn))
	}
	rec := newRecorder()
	var left int64 = math.MaxInt64
	if *requests > 0 {
		left = *requests
	}
	started := time.Now()
	stopAt := started.Add(*duration)
	take := func() bool {
		return atomic.LoadInt32(&stopped) == 0 && time.Now().Before(stopAt) && atomic.AddInt64(&left, -1) >= 0
	}
	run := func(r *rand.Rand) {
		op := c.pick(r)
		begin := time.Now()
		code := c.one(op, r)
		rec.add(op, time.Since(begin).Seconds(), code)
	}
	var wg sync.WaitGroup
	if *mode == "closed" {
		for i := 0; i < *concurrency; i++ {
			wg.Add(1)
			go func(r *rand.Rand) {
				defer wg.Done()
				for take() {
					run(r)
				}
			}(rand.New(rand.NewSource(*seed + int64(i) + 1)))
		}
	} else {
		var outstanding int64
		next := time.Now()
		arrivals := rand.New(rand.NewSource(*seed + 7919))
		for i := int64(0); take(); i++ {
			next = next.Add(time.Duration(arrivals.ExpFloat64() / *rate * float64(time.Second)))
			if wait := time.Until(next); wait > 0 {
				time.Sleep(wait)
			}
			if atomic.LoadInt64(&outstanding) >= maxOutstanding {
				rec.mu.Lock()
				rec.skipped++
				rec.mu.Unlock()
				continue
			}
			atomic.AddInt64(&outstanding, 1)
			wg.Add(1)
			go func(r *rand.Rand) {
				defer wg.Done()
				defer atomic.AddInt64(&outstanding, -1)
				run(r)
			}(rand.New(rand.NewSource(*seed + i + 1)))
		}
	}
	wg.Wait()
	elapsed := time.Since(started).Seconds()
	ok := rec.codes["OK"]
	requestCount := 0
	for _, n := range rec.codes {
		requestCount += n
	}
	latency := map[string]interface{}{}
	for op, values := range rec.latencies {
		latency[op] = percentiles(values)
	}
	byCode := map[string]interface{}{}
	for code, values := range rec.latencyByCode {
		byCode[code] = percentiles(values)
	}
	report := map[string]interface{}{
		"address": *address, "mode": *mode, "mix": mix, "seconds": math.Round(elapsed*1000) / 1000,
		"requests": requestCount, "ok": ok, "qps": math.Round(float64(ok)/elapsed*100) / 100, "codes": rec.codes,
		"skipped_over_outstanding_cap": rec.skipped, "latency": latency, "codes_by_operation": rec.codesByOp,
		"latency_by_code": byCode, "connections": *connections, "load_generator": "lookalike-loadgen (Go)",
	}
	if *mode == "closed" {
		report["concurrency"], report["rate"] = *concurrency, nil
	} else {
		report["concurrency"], report["rate"] = nil, *rate
	}
	if *asJSON {
		out, _ := json.MarshalIndent(report, "", "  ")
		fmt.Println(string(out))
		return
	}
	fmt.Printf("%s loop on %s: %d requests in %.1f s, %.1f OK/s\n", *mode, *address, requestCount, elapsed, float64(ok)/elapsed)
	fmt.Printf("codes: %v\n", rec.codes)
	for op, stats := range latency {
		s := stats.(map[string]interface{})
		fmt.Printf("%-10s p50 %v ms, p90 %v ms, p99 %v ms, max %v ms\n", op, s["p50_ms"], s["p90_ms"], s["p99_ms"], s["max_ms"])
	}
}
