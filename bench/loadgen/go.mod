module gateway.bench/loadgen

go 1.22
