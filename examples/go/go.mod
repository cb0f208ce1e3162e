module example.com/reload-go-server

go 1.19
